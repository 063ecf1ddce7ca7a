"""What makes the method fast and robust, kept out of the concept files (model.py, residual_q.py,
bt_loss.py, data.py, train.py, sample.py), which call into it where it belongs:

    loading.py       device and dtype (decided once), the frozen base model, heads on disk
    vocab_chunks.py  products with the vocabulary a block at a time, in float32: log Z, V, KL, logits
    fused_path.py    the default training, evaluation and decoding path: Q_R(s,a), log pi1(a|s), V(s)
                     without (B, T, V) tensors, tested equal to the plain path of the concept files
    frozen_cache.py  the frozen model's outputs kept across epochs (memory, then disk)
    run_state.py     atomic checkpoints, --resume, metrics files, stop signals (SIGINT, SIGTERM, SIGHUP),
                     a checkpoint that cannot be written, a step out of GPU memory
    distributed.py   torchrun: processes, data shares, summed metrics
    data_files.py    reading .jsonl / .json / .parquet files and hub data sets into rows
    cli.py           one-line errors and exit codes
    compat.py        the one transformers call that differs between releases (the KV cache keyword)
"""
