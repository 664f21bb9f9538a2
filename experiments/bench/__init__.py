"""Benchmark: the EMA update at memory-bandwidth speed (issue 5), measured side by side.

An EMA update is pure memory traffic: read the average, read the params, write the
average — 12 B per fp32 parameter. Every implementation runs in the same process,
round-robin (one call of each, repeated, each starting with cold CPU caches as in a
training loop), and the median is reported; ratios that decide a goal are also measured
paired (back to back in each round). One module per concern:

* ``harness``      timing (cold caches, medians, paired ratios) and the workloads' inputs
* ``update``       P1: one update per implementation (ema_jax, flat buffers, optax.ema,
                   NumPy copy, torch ``_foreach_lerp_``), the fixed cost per leaf, and what
                   each implementation choice (guard, donation, ``update_every``) costs
* ``train_step``   P2: the RUL model's train step and an Adam step, with vs without EMA
* ``memory``       P3: params + Adam + EMA, donated, in live bytes
* ``multi_decay``  P4: K decays in one update vs K separate updates
* ``bandwidth``    the device goal: the update's share of the copy bandwidth
* ``flags``        P1 and P2 under other XLA_FLAGS, each in a fresh process
* ``goals``        the goals as data; ``report`` renders the results as Markdown

    python -m experiments.bench --quick            # smoke run, ~1 minute
    python -m experiments.bench --bandwidth-only   # the device goal alone (on a GPU)
    python -m experiments.bench --json experiments/results/bench_cpu.json \\
        --md experiments/results/bench_cpu.md      # the full table (several minutes)

torch is optional (``pip install -e '.[bench]'``); without it its columns are empty.
"""
