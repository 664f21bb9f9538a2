"""Run configuration and its command lines: one definition per option, checked in Python and
on the command line alike, and reproducing commands that parse back to the run's config."""

import dataclasses
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import claims, runs, sweep, train_rul, window_check
from experiments.cli import FIELDS, ConfigFlags, flag_name
from experiments.config import MODEL_SPECS, SWITCH, Config

# One config with every field away from its default (each flag is exercised).
EVERY_FIELD_SET = Config(
    data_dir="data dir/with space",
    subset="FD003",
    model="dcnn_li",
    epochs=7,
    batch_size=64,
    lr=3e-4,
    weight_decay=1.234567e-5,
    cosine=False,
    lr_drop_epoch=5,
    lr_drop_factor=0.3,
    ema_decays=(0.9, 0.99),
    ema_debias=(True, True),
    seed=3,
    refit_all=True,
    window=40,
    max_rul=130.0,
    smooth=0.25,
    members=2,
    min_prefix=31,
    cycle_feature=True,
    perturb=(0.01, 0.05),
    perturb_draws=2,
    progress=False,
)


def test_every_config_field_has_one_flag_whose_default_is_the_configs(capsys):
    """``train_rul`` has a flag for every :class:`Config` field, and no flag at all gives
    ``Config()``: the flags and their defaults come from the fields."""
    p = train_rul.parser()
    flags = {flag for action in p._actions for flag in action.option_strings}
    assert {flag_name(f) for f in FIELDS.values()} <= flags
    switches = {"--no-" + flag_name(f)[2:] for f in FIELDS.values() if f.metadata["kind"] is SWITCH}
    negated = {flag for flag in flags if flag.startswith("--no-")}
    assert "--no-ema-debias" in negated and negated == switches  # each switch: on and off
    assert flags - {flag_name(f) for f in FIELDS.values()} - negated == {"-h", "--help", "--out"}
    assert train_rul.FLAGS.parse(p, [])[1] == Config()
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--ema-decay EMA_DECAY [EMA_DECAY ...]" in text and "--no-progress" in text
    assert "(default: 30)" in text and "(default: 0.999)" in text  # derived, never typed
    for action in p._actions:  # every option shows its default, switches as on/off
        if action.option_strings != ["-h", "--help"]:
            assert "(default: " in (action.help or ""), action.option_strings
    assert "--ema-debias, --no-ema-debias" in text


def test_defaults_are_the_standard_preprocessing_and_training():
    """Defaults unchanged: window 30, cap 125, no smoothing, one model, no prefixes; 30
    epochs of batch 256 at lr 1e-3; one bias-corrected EMA, β = 0.999 (a plain one still
    carries the initial weights after a short run)."""
    cfg = Config()
    assert (cfg.window, cfg.max_rul, cfg.smooth, cfg.members, cfg.min_prefix) == (
        30, 125.0, 0.0, 1, 0
    )  # fmt: skip
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.ema_decays, cfg.ema_debias) == (
        30, 256, 1e-3, (0.999,), (True,)
    )  # fmt: skip
    assert cfg.preprocessing() == {
        "window": 30, "max_rul": 125.0, "smooth": 0.0, "min_prefix": 0, "cycle_feature": False
    }  # fmt: skip


@pytest.mark.parametrize(
    "cfg",
    [EVERY_FIELD_SET, dataclasses.replace(EVERY_FIELD_SET, lr_drop_epoch=0, cosine=True)],
    ids=["lr-drop", "cosine"],
)
def test_argv_round_trips_through_the_parser(cfg):
    """``FLAGS.argv(cfg)`` names only what differs from the defaults, and parses back to
    ``cfg``: every field, floats that ``:g`` would round, a path with a space."""
    words = train_rul.FLAGS.argv(cfg)
    # config(parse_args) rather than parse(): parse also reads --data-dir, which is made up here
    assert train_rul.FLAGS.config(train_rul.parser().parse_args(words)) == cfg
    assert words[words.index("--weight-decay") + 1] == "1.234567e-05"
    assert ("--cosine" in words) == cfg.cosine  # a switch at its default is not written
    assert train_rul.FLAGS.argv(Config()) == []
    assert train_rul.FLAGS.argv(Config(ema_decays=(0.9, 0.99), ema_debias=(True, True))) == [
        "--ema-decay",
        "0.9",
        "0.99",
    ]
    assert train_rul.FLAGS.argv(Config(ema_decays=(0.9,), ema_debias=(False,))) == [
        "--ema-decay",
        "0.9",
        "--no-ema-debias",
    ]
    with pytest.raises(ValueError, match="--ema-debias / --no-ema-debias turn on all or none"):
        train_rul.FLAGS.argv(Config(ema_decays=(0.9, 0.99), ema_debias=(True, False)))


def _fake_runs(cfg: Config, seeds: int) -> list[dict]:
    return [{"config": dataclasses.asdict(dataclasses.replace(cfg, seed=s))} for s in range(seeds)]


def test_sweep_run_command_reproduces_the_stored_configs():
    """The command a sweep report prints, parsed by the sweep, gives back every stored
    run's config (model and seed from ``--models`` / ``--seeds``)."""
    stored = Config.from_json(
        json.loads(json.dumps(dataclasses.asdict(EVERY_FIELD_SET)))  # as history.json has it
    )
    stored = dataclasses.replace(
        stored, ema_decays=runs.SWEEP_DECAYS, ema_debias=runs.SWEEP_DEBIAS, progress=False
    )
    results = _fake_runs(stored, 3)
    command = sweep.run_command("dcnn_li" + runs.REFIT_SUFFIX, results)
    prefix = "python -m experiments.sweep "
    assert command.startswith(
        prefix + "--models dcnn_li --seeds 3 --data-dir 'data dir/with space'"
    )
    args = sweep.parser().parse_args(shlex.split(command[len(prefix) :]))
    base = sweep.FLAGS.config(  # not parse(), which would read the made-up --data-dir
        args,
        ema_decays=runs.SWEEP_DECAYS,
        ema_debias=runs.SWEEP_DEBIAS,
        progress=False,
    )
    assert args.models == ["dcnn_li"]
    rebuilt = [dataclasses.replace(base, model=m, seed=s) for m in args.models for s in range(3)]
    assert rebuilt == [Config.from_json(r["config"]) for r in results]


def test_stored_configs_read_back_with_defaults_for_later_settings():
    """A run stored before a setting existed ran at its default; lists are tuples again."""
    stored = dataclasses.asdict(Config(ema_decays=(0.9,), perturb=(0.01,)))
    del stored["min_prefix"], stored["cycle_feature"]
    stored = json.loads(json.dumps(stored))
    assert Config.from_json(stored) == Config(ema_decays=(0.9,), perturb=(0.01,))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "mlp"}, r"model must be one of \['cnn_attn', 'cnn_gru', 'cnn_gru_bn', 'dcnn'"),
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
        ({"epochs": True}, "epochs must be an integer >= 1, got True"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"lr": float("inf")}, "lr must be a finite number > 0"),
        ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
        ({"ema_decays": (1.0,)}, r"ema_decays must be a number in \[0, 1\), got 1.0"),
        ({"ema_decays": ()}, "ema_decays must hold at least one decay"),
        ({"ema_decays": (0.9, 0.99)}, "ema_debias needs one bool per decay"),
        ({"ema_debias": (1,)}, "ema_debias must be True or False, got 1"),
        ({"perturb": (0.0,)}, "perturb must be a finite number > 0"),
        ({"lr_drop_epoch": -1}, "lr_drop_epoch must be an integer >= 0"),
        ({"lr_drop_epoch": 5, "cosine": True}, "exclusive schedules"),
        ({"lr_drop_factor": 0.0}, r"lr_drop_factor must be a number in \(0, 1\]"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"window": 0}, "window must be an integer >= 1"),
        ({"members": 0}, "members must be an integer >= 1"),
        ({"max_rul": 0.0}, "max_rul must be a finite number > 0"),
        ({"smooth": 1.0}, r"smooth must be a number in \[0, 1\)"),
        ({"min_prefix": -1}, "min_prefix must be an integer >= 0"),
        ({"perturb_draws": 0}, "perturb_draws must be an integer >= 1"),
        ({"cycle_feature": 1}, "cycle_feature must be True or False"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Config(**kwargs)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--window", "0"], "argument --window: must be an integer >= 1, got '0'"),
        (["--members", "two"], "argument --members: must be an integer >= 1, got 'two'"),
        (["--max-rul", "-5"], "argument --max-rul: must be a finite number > 0, got '-5'"),
        (["--smooth", "1"], r"argument --smooth: must be a number in \[0, 1\), got '1'"),
        (["--min-prefix", "-2"], "argument --min-prefix: must be an integer >= 0, got '-2'"),
        (["--epochs", "2.5"], "argument --epochs: must be an integer >= 1, got '2.5'"),
        (["--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
        (["--ema-decay", "0.9", "1"], r"argument --ema-decay: must be a number in \[0, 1\)"),
        (["--perturb", "0"], "argument --perturb: must be a finite number > 0, got '0'"),
        (["--seed", "-1"], "argument --seed: must be an integer >= 0, got '-1'"),
        (["--lr-drop-factor", "2"], r"argument --lr-drop-factor: must be a number in \(0, 1\]"),
        (["--model", "mlp"], r"argument --model: must be one of \['cnn_attn'"),
        (["--cosine", "--lr-drop-epoch", "3"], "lr_drop_epoch and cosine are exclusive"),
        (["--switch-every", "3"], r"--switch-every\) is Switch EMA's: add --switch-ema"),
        (["--bema-start-step", "100"], r"--bema-start-step\) is BEMA's burn-in: add --bema"),
        (["--subset", "FD005"], r"argument --subset: must be one of \['FD001'"),
        (["--data-dir", "/nonexistent"], r"argument --data-dir: C-MAPSS file \S+ not found"),
        (
            ["--ema-decay", "0.99999999"],
            r"ema_decays \(--ema-decay\): 0.99999999 rounds to 1.0 in float32.*at most 0.99999994$",
        ),
        (["--monitor", "val_acc"], r"argument --monitor: must be best_ema, .*got 'val_acc'"),
        (["--monitor", "val_acc_ema[0]"], r"argument --monitor: .*<metric> one of loss, mse"),
    ],
)
def test_cli_rejects_bad_values_in_one_argparse_line(argv, message, capsys):
    """A bad value is an argparse error: usage, one line naming the flag, exit status 2;
    no traceback. The same for a combination (checked by Config, reported by argparse)."""
    with pytest.raises(SystemExit) as exc:
        train_rul.FLAGS.parse(train_rul.parser(), argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: python -m experiments.train_rul")
    assert re.fullmatch(r"python -m experiments\.train_rul: error: .*", err[-1])
    assert re.search(message, err[-1])


def test_each_cli_takes_the_config_flags_it_does_not_set_itself():
    """``sweep`` sets decays, model and seed itself; ``window_check`` the window and seed,
    and compares single models; ``claims`` needs only the timing data. Each takes the other
    Config flags, under the same names."""
    every = set(FIELDS)
    assert every - set(sweep.FLAGS.names) == {
        "model",
        "ema_decays",
        "ema_debias",
        "seed",
        "progress",
    }
    assert every - set(window_check.FLAGS.names) == {"window", "seed", "members", "progress"}
    assert claims.FLAGS.names == ("data_dir", "subset", "batch_size", "window", "cycle_feature")
    assert sweep.FLAGS.default("perturb") == (0.01, 0.02, 0.05)
    assert sweep.FLAGS.parse(sweep.parser(), [])[1].perturb == (0.01, 0.02, 0.05)
    assert sweep.FLAGS.parse(sweep.parser(), ["--perturb"])[1].perturb == ()


def test_window_check_refuses_a_flag_it_does_not_take():
    with pytest.raises(SystemExit):  # not a flag of window_check
        window_check.main(["--members", "2"])


def test_config_flags_refuse_names_that_are_not_config_fields():
    with pytest.raises(ValueError, match=r"not fields of Config: \['modle'\]"):
        ConfigFlags(("modle",))


def test_model_names_are_those_of_the_model_registry():
    """Config checks model names without Flax; the registry is built from the same specs."""
    from experiments.models import MODELS

    assert list(MODELS) == list(MODEL_SPECS)


def test_config_and_reports_import_no_jax(tmp_path):
    """``experiments.config``, ``experiments.cli`` and ``experiments.sweep`` import no JAX,
    and neither does ``sweep --report-only`` rendering a stored run."""
    rows = [{"epoch": e, "val_rmse_raw": 15.0 - e, "val_loss_raw": 0.02} for e in (1, 2)]
    metrics = {"val_rmse": 14.0, "rmse": 13.0, "score": 300.0, "epoch": 2}
    run = {
        "config": dataclasses.asdict(Config(model="dcnn")),
        "rows": rows,
        "test": {"last": {"raw": metrics}, "best": {"raw": metrics}},
    }
    (tmp_path / "runs" / "dcnn").mkdir(parents=True)
    (tmp_path / "runs" / "dcnn" / "seed0.json").write_text(json.dumps(run))
    code = (
        "import sys\n"
        "import experiments.config, experiments.cli, experiments.sweep as s\n"
        "assert 'jax' not in sys.modules, 'imported jax'\n"
        f"s.main(['--report-only', '--models', 'dcnn', '--runs', {str(tmp_path / 'runs')!r},"
        f" '--out', {str(tmp_path)!r}, '--name', 'r'])\n"
        "assert 'jax' not in sys.modules, 'the report imported jax'\n"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert done.returncode == 0, done.stderr
    assert "## dcnn: 1 seeds, 30 epochs" in (tmp_path / "r.md").read_text()


def test_a_malformed_data_file_is_one_line_naming_file_and_line(tmp_path):
    """A non-C-MAPSS file is no numpy traceback naming neither file nor line: the command (a
    real process) exits 2 with argparse's one line, before any training."""
    from experiments import synthetic

    synthetic.write(tmp_path, synthetic.generate(n_train=3, n_test=2, seed=0))
    path = tmp_path / "train_FD001.txt"
    path.write_text("hello world\n" + path.read_text())
    argv = [sys.executable, "-m", "experiments.train_rul", "--data-dir", str(tmp_path)]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2]
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"python -m experiments.train_rul: error: argument --data-dir: {path}, line 1: "
        "2 fields, expected 26"
    )
