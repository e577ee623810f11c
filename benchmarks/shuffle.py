"""Shuffle quality of the store reader against a full shuffle, on a store written in document order.

    python benchmarks/shuffle.py                       # the README table (about a minute)
    python benchmarks/shuffle.py --rows 2000000 --buffers 65536 262144

Writes a metadata-only store (a 1-wide float16 hook) whose rows are tokens of documents of
geometric length (mean --mean-doc) packed in order into windows of --context-size, then prints,
per shuffle buffer, the distinct windows and documents per batch of ``iter_batches`` against a
uniform shuffle of the whole store (sae_core/shuffle_quality.py), and the passes the reader chose.
"""

from __future__ import annotations

import argparse
import tempfile

from sae_core.shuffle_quality import shuffle_quality
from sae_core.store import ActivationStore
from sae_core.synthetic import write_document_ordered_store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8_000_000)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--mean-doc", type=int, default=600, help="mean document length in tokens")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--buffers", type=int, nargs="+", default=[1 << 17, 1 << 19, 1 << 21])
    p.add_argument("--batches", type=int, default=100, help="batches measured per buffer")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        store = ActivationStore(write_document_ordered_store(folder, args.rows, context_size=args.context_size,
                                                             mean_doc=args.mean_doc))
        print(f"{args.rows} rows, context {args.context_size}, mean document {args.mean_doc} tokens, "
              f"batch {args.batch_size}")
        print("| shuffle_buffer | passes | windows/batch (full shuffle) | ratio | docs/batch (full shuffle) | ratio |")
        print("|---:|---:|---:|---:|---:|---:|")
        for buffer in args.buffers:
            for passes in (1, None):  # whole row groups only, then the reader's choice
                q = shuffle_quality(store, args.batch_size, shuffle_buffer=buffer, max_batches=args.batches,
                                    passes=passes)
                print(f"| {buffer} | {q.passes} | {q.windows_per_batch:.0f} ({q.full_windows_per_batch:.0f}) | "
                      f"{q.window_ratio:.3f} | {q.docs_per_batch:.0f} ({q.full_docs_per_batch:.0f}) | "
                      f"{q.doc_ratio:.3f} |")


if __name__ == "__main__":
    main()
