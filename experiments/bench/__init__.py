"""Benchmark: the EMA update against what users would otherwise write, measured
side by side.

An EMA update is pure memory traffic: read the average, read the params, write the
average — 12 B per fp32 parameter. Every implementation runs in the same process,
round-robin (one call of each, repeated, with cold CPU caches as in a training loop, and
again warm), and the median is reported; ratios that decide a goal are also measured
paired (back to back in each round). One module per concern:

* ``harness``      timing (cold / warm caches, medians, paired ratios) and the workloads
* ``update``       G1–G3: one update per implementation (ema_jax with and without its
                   guard, a hand-written lerp, the plain cond+lerp guard, a flat buffer,
                   optax.ema, flax nnx.EMA, NumPy copy, torch ``_foreach_lerp_``), the fixed
                   cost per leaf, and what each choice (guard, donation, ``update_every``) costs
* ``train_step``   G4: an Adam train step of a ~10M-param MLP and of the RUL model, with vs
                   without EMA; an Adam step alone (the XLA flags table)
* ``nnx_update``   G5: ema_jax.nnx.EMA vs flax's nnx.EMA vs the functional update
* ``memory``       P3: params + Adam + EMA, donated, in live bytes
* ``multi_decay``  P4: K decays in one update vs K separate updates
* ``placement``    P5: EMA bytes per device, replicated vs ``shard_over`` (1/N), and the
                   compiled step's collectives (none); P6: host offload on a GPU
* ``bandwidth``    the device goal: the update's share of the copy bandwidth
* ``flags``        the update and the Adam step under other XLA_FLAGS, each in a fresh process
* ``goals``        the goals as data; ``report`` renders the results as Markdown

    python -m experiments.bench --quick            # smoke run, ~1 minute
    python -m experiments.bench --bandwidth-only   # the device goal alone (on a GPU)
    python -m experiments.bench --json experiments/results/bench_cpu.json \\
        --md experiments/results/bench_cpu.md      # the full table (several minutes)

torch is optional (``pip install -e '.[bench]'``); without it its columns are empty.
"""
