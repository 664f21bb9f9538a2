"""Test-wide settings: 8 host CPU devices, so sharding tests run on any machine.

XLA reads the flag when the backend starts, so it is set before anything imports jax.

The ``floors`` marker selects the fast subset that ``make test-floors`` runs on the oldest
versions pyproject.toml declares (both README quickstarts and every docs example, a
checkpoint round trip, a post-hoc synthesis). It is given here by test function name, so
the subset survives test files being moved or renamed; a name below that no test carries
any more stops ``pytest -m floors`` (run on the whole suite, as the target does) with an error
instead of quietly shrinking the subset.
"""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

FLOOR_TESTS = frozenset(
    {
        # README.md's Linen and NNX quickstarts and every python block of docs/*.md
        "test_python_blocks_run",
        "test_multi_process_blocks_run",
        # the bash blocks' `python -m M --help`: the entry points import at the floors
        "test_bash_blocks_name_real_commands",
        # checkpoint round trips: Linen resume in a new process, the EMA-only item, NNX
        "test_resume_in_a_new_process_is_bitwise",
        "test_load_ema_params_reads_only_the_ema_item",
        "test_resume_in_a_new_process_is_bit_exact_and_the_export_serves_inference",
        # post-hoc EMA: synthesis against a tracked EMA, and from a snapshot directory
        "test_synthesized_matches_directly_tracked_ema",
        "test_directory_round_trip",
        "test_cli_writes_an_export_that_load_exported_reads",
    }
)


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection reads the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    found = set()
    for item in items:
        name = getattr(item, "originalname", item.name)
        if name in FLOOR_TESTS:
            item.add_marker(pytest.mark.floors)
            found.add(name)
    missing = FLOOR_TESTS - found
    whole_suite = config.args_source == pytest.Config.ArgsSource.TESTPATHS
    if config.option.markexpr == "floors" and whole_suite and missing:
        pytest.exit(
            f"tests/conftest.py FLOOR_TESTS names tests that were not collected: "
            f"{sorted(missing)}; update the list to the tests' new names",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )
