"""Port Engram weights between DeepSeek's demo (engram_demo_v1.py) and our EngramBlock.

    python tools/port_reference.py to-ours demo_block.pt ours.pt --layer-id 1 experiment=debug_cpu \
        engram.table_size_per_ngram=[646400,646400]
    python tools/port_reference.py to-demo ours.pt demo_block.pt --layer-id 1 experiment=debug_cpu ...

to-ours reads a ``torch.save``d demo state dict -- a ``TransformerBlock``'s (``engram.`` keys), the
whole model's (``layers.<l>.engram.`` keys) or a bare ``Engram`` module's -- and writes the
``EngramBlock.state_dict()`` of layer ``--layer-id``; to-demo writes the ``TransformerBlock``
state dict (``engram.`` keys, ``multi_head_embedding.offsets`` included) that the demo loads with
``strict=True``.  The block is built from the configuration (``key=value`` overrides composed like
engram-train): ``model.hidden_size``, ``engram.*``; its table sizes are
``engram.table_size_per_ngram`` or, unset, ``table_size_multiplier`` x the compressed vocabulary
of ``--tokenizer`` (a tokenizer.json or Hugging Face tokenizer directory; default
``<data.dir>/tokenizer.json``).  The demo sizes its tables from the raw vocabulary (5 x 129280):
a mismatch is reported in one line naming the engram.table_size_per_ngram to set
(docs/engram.md, "Porting the demo's weights").
"""

import argparse
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build_block(cfg, layer_id: int, tokenizer):
    from engram_train.engram.block import EngramBlock
    from engram_train.engram.hashing import prime_table_sizes, table_size_per_ngram
    from engram_train.errors import MissingInputError

    e = cfg.engram
    if layer_id not in list(e.layer_ids):
        from engram_train.config.schema import ConfigError

        raise ConfigError(f"--layer-id={layer_id}: not one of engram.layer_ids={list(e.layer_ids)}; name an Engram layer")
    compressed = 0
    if not e.table_size_per_ngram:
        from engram_train.engram.compress import load_or_build_compression

        path = tokenizer or os.path.join(cfg.data.dir, "tokenizer.json")
        if not os.path.exists(path):
            raise MissingInputError(f"--tokenizer={path}: does not exist; the table sizes need the compressed "
                                    f"vocabulary: give --tokenizer, or set engram.table_size_per_ngram")
        _, compressed = load_or_build_compression(path)
    starts = table_size_per_ngram(e, compressed)
    sizes = prime_table_sizes(list(e.layer_ids), e.max_ngram, e.heads_per_ngram, starts)[layer_id]
    return EngramBlock(cfg.model.hidden_size, cfg.model.hc_mult, sizes, e.n_embed_per_ngram, e.heads_per_ngram, e.max_ngram,
                       kernel_size=e.kernel_size)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("direction", choices=["to-ours", "to-demo"])
    ap.add_argument("src", help="state dict to read (torch.save file)")
    ap.add_argument("dst", help="state dict to write")
    ap.add_argument("--layer-id", type=int, required=True, help="the Engram layer (0-based, as engram.layer_ids)")
    ap.add_argument("--tokenizer", help="tokenizer.json or tokenizer directory (for the compressed vocabulary)")
    ap.add_argument("overrides", nargs="*", help="configuration overrides, key=value")
    args = ap.parse_intermixed_args()   # overrides may follow --layer-id

    from engram_train.config.store import compose
    from engram_train.errors import MissingInputError

    cfg = compose(args.overrides)
    if not os.path.isfile(args.src):
        raise MissingInputError(f"{args.src}: no such file; give a torch.save'd state dict")
    import torch

    from engram_train.engram.port import demo_state_dict, load_demo_state_dict

    block = build_block(cfg, args.layer_id, args.tokenizer)
    sd = torch.load(args.src, map_location="cpu", weights_only=True)
    if args.direction == "to-ours":
        load_demo_state_dict(block, sd, layer_id=args.layer_id, layer_ids=list(cfg.engram.layer_ids))
        out = block.state_dict()
    else:
        block.load_state_dict(sd, strict=True)
        out = demo_state_dict(block)
    torch.save(out, args.dst)
    print(f"{args.direction}: layer {args.layer_id}, {len(out)} tensors, table sizes {block.table_sizes} -> {args.dst}")


if __name__ == "__main__":
    from engram_train.errors import run_main

    run_main(main, prog="port_reference")
