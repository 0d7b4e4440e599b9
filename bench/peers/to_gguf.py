"""A Hugging Face checkpoint to GGUF with llama.cpp's own converter (the one vendored in llama-cpp-python's
sdist, with its `gguf-py`), run with Shuttle's .venv python (torch, numpy, safetensors are there).

    .venv/bin/python bench/peers/to_gguf.py LLAMA_CPP_DIR MODEL_DIR OUT.gguf --outtype f32|bf16

The benchmark's random checkpoint has no tokenizer; the converter needs a vocabulary, so one is
supplied from llama.cpp's `models/ggml-vocab-llama-spm.gguf` (32000 tokens), cut to the model's vocab
size, by the converter's own `_set_vocab_builtin`. Only token strings come from it: the benchmark
feeds ids, so the weights and the computation are the checkpoint's.
"""

from __future__ import annotations

import argparse
import os
import sys

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("llama_dir", help="the vendored llama.cpp (holds convert_hf_to_gguf.py, gguf-py, models/)")
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--outtype", choices=("f32", "bf16", "f16"), default="f32")
    args = ap.parse_args()
    sys.path.insert(0, args.llama_dir)        # _set_vocab_builtin looks in sys.path[0]/models
    import convert_hf_to_gguf
    from conversion.llama import LlamaModel

    own_set_vocab = LlamaModel.set_vocab

    def set_vocab(self) -> None:
        if any((self.dir_model / name).is_file() for name in TOKENIZER_FILES):
            return own_set_vocab(self)
        vocab = self.hparams["vocab_size"]
        if vocab > 32000:
            raise SystemExit(f"{self.dir_model}: no tokenizer and vocab {vocab} > the 32000 tokens of ggml-vocab-llama-spm")
        self._set_vocab_builtin("llama-spm", vocab)

    LlamaModel.set_vocab = set_vocab
    tmp = args.out + ".tmp"
    sys.argv = ["convert_hf_to_gguf.py", args.model_dir, "--outfile", tmp, "--outtype", args.outtype]
    convert_hf_to_gguf.main()
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**30:.2f} GiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
