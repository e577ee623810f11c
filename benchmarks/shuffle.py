"""Shuffle quality of the store reader against a full shuffle, on stores written in document order.

    python benchmarks/shuffle.py                       # the README's window/document table
    python benchmarks/shuffle.py --rows 2000000 --buffers 65536 262144
    python benchmarks/shuffle.py --loss                # the README's training-loss table (a few minutes)

Without --loss: writes a metadata-only store (a 1-wide float16 hook) whose rows are tokens of documents
of geometric length (mean --mean-doc) packed in order into windows of --context-size, then prints, per
shuffle buffer, the distinct windows and documents per batch of ``iter_batches`` against a uniform
shuffle of the whole store (sae_core/shuffle_quality.py).

With --loss: writes a small document-ordered store of topic-structured activations (each document
draws one of 16 topics; sae_core.synthetic.topic_activations) and trains a TopK SAE one epoch on it
through each shuffle buffer, printing the held-out FVU (on other documents) against a full shuffle's,
averaged over --seeds. Buffers are given as x = context_size * batch_size / buffer, the number that
sets the shuffle's quality (the default buffer is x = 1 at context 128 and batch 4096).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from sae_core.shuffle_quality import shuffle_quality, training_fvu
from sae_core.store import ActivationStore
from sae_core.synthetic import document_rows, topic_activations, write_document_ordered_store


def window_table(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = ActivationStore(write_document_ordered_store(folder, args.rows, context_size=args.context_size,
                                                             mean_doc=args.mean_doc))
        print(f"{args.rows} rows, context {args.context_size}, mean document {args.mean_doc} tokens, "
              f"batch {args.batch_size}")
        print("| shuffle_buffer | x | windows/batch (full shuffle) | ratio | docs/batch (full shuffle) | ratio |")
        print("|---:|---:|---:|---:|---:|---:|")
        for buffer in args.buffers:
            q = shuffle_quality(store, args.batch_size, shuffle_buffer=buffer, max_batches=args.batches)
            x = args.context_size * args.batch_size / buffer
            print(f"| {buffer} | {x:g} | {q.windows_per_batch:.0f} ({q.full_windows_per_batch:.0f}) | "
                  f"{q.window_ratio:.3f} | {q.docs_per_batch:.0f} ({q.full_docs_per_batch:.0f}) | {q.doc_ratio:.3f} |")


def loss_table(args: argparse.Namespace) -> None:
    rows, context, batch, topics = 32_768, 32, 256, 16
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        store = ActivationStore(write_document_ordered_store(folder, rows, context_size=context, mean_doc=150, d=32,
                                                             n_topics=topics, rows_per_file=16_384))
        held_out = torch.from_numpy(topic_activations(document_rows(16_384, mean_doc=150, seed=7), d=32,
                                                      n_topics=topics))
        print(f"{rows} rows, context {context}, mean document 150 tokens, {topics} topics, batch {batch}, "
              f"TopK d_sae 128 k 4, one epoch; mean of {args.seeds} seeds (min-max)")

        def fvus(buffer: int) -> list[float]:
            return [training_fvu(store, held_out, shuffle_buffer=buffer, steps=rows // batch, batch_size=batch,
                                 d_sae=128, k=4, seed=seed) for seed in range(args.seeds)]

        full = fvus(rows)
        print("| x | shuffle_buffer | windows/batch ratio | held-out FVU | vs full shuffle |")
        print("|---:|---:|---:|---:|---:|")
        for x in args.x:
            buffer = int(context * batch / x)
            values = full if buffer >= rows else fvus(buffer)
            ratio = shuffle_quality(store, batch, shuffle_buffer=buffer, max_batches=64).window_ratio
            gaps = [v / f - 1 for v, f in zip(values, full, strict=True)]
            print(f"| {x:g} | {buffer} | {ratio:.2f} | {statistics.mean(values):.4f} | "
                  f"{statistics.mean(gaps):+.1%} ({min(gaps):+.1%} to {max(gaps):+.1%}) |")
        print(f"| full | {rows} | 1.00 | {statistics.mean(full):.4f} | 0 |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8_000_000)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--mean-doc", type=int, default=600, help="mean document length in tokens")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--buffers", type=int, nargs="+", default=[1 << 18, 1 << 19, 1 << 20])
    p.add_argument("--batches", type=int, default=300,
                   help="batches measured per buffer (the buffer fills during its first buffer / batch_size)")
    p.add_argument("--loss", action="store_true", help="the training-loss comparison instead")
    p.add_argument("--x", type=float, nargs="+", default=[32, 8, 4, 2, 1, 0.5], help="--loss: buffers as x values")
    p.add_argument("--seeds", type=int, default=3, help="--loss: seeds per buffer")
    args = p.parse_args()
    (loss_table if args.loss else window_table)(args)


if __name__ == "__main__":
    main()
