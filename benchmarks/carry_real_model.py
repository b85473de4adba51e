"""Bring a packaged real model to the offline GPU machine, whose `device` calls carry at most 64 MiB each.

    # here: the transformers folder that set-up builds, without its weights, and the source GGUF in parts
    python benchmarks/carry_real_model.py pack smollm2-135m-instruct .gpu/smollm2 --part-mib 60
    # there, once every part has arrived (one call each, while the machine stays warm):
    python benchmarks/carry_real_model.py unpack /tmp/smollm2-parts /tmp/smollm2

The weights are rebuilt there from the GGUF with the same transformers calls as here
(`tunepipe.tasks.model.gguf_folder.dequantized_model`); every other file, the tokenizer checked against llama.cpp
here included, is carried as built. The GGUF's sha256 is checked after the parts are joined.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

MANIFEST = "carry.json"


def pack(name: str, out: Path, part_mib: int) -> None:
    from tunepipe.tasks.model.base import resolve_base_model
    from tunepipe.tasks.model.packaged import packaged_gguf
    from tunepipe.tasks.runtime.config import ModelConfig

    gguf = packaged_gguf(name)
    folder = Path(resolve_base_model(ModelConfig(base=str(gguf))).name_or_path)
    out.mkdir(parents=True, exist_ok=True)
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix != ".safetensors"]
    for path in files:
        shutil.copy2(path, out / path.name)
    parts, digest = [], hashlib.sha256()
    with gguf.open("rb") as src:
        while block := src.read(part_mib << 20):
            digest.update(block)
            part = out / f"{gguf.name}.part{len(parts):02d}"
            part.write_bytes(block)
            parts.append(part.name)
    manifest = {"gguf": gguf.name, "sha256": digest.hexdigest(), "parts": parts, "files": sorted(p.name for p in files)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{out}: {len(files)} files and {len(parts)} parts of {gguf.name} (carry each part in its own call)")


def unpack(parts_dir: Path, out: Path) -> None:
    from tunepipe.tasks.model.gguf_folder import dequantized_model

    manifest = json.loads((parts_dir / MANIFEST).read_text())
    out.mkdir(parents=True, exist_ok=True)
    gguf = out / manifest["gguf"]
    digest = hashlib.sha256()
    with gguf.open("wb") as dst:
        for part in manifest["parts"]:
            block = (parts_dir / part).read_bytes()
            digest.update(block)
            dst.write(block)
    if digest.hexdigest() != manifest["sha256"]:
        raise SystemExit(
            f"{gguf}: sha256 {digest.hexdigest()}, expected {manifest['sha256']}: a part is missing or damaged"
        )
    for name in manifest["files"]:
        shutil.copy2(parts_dir / name, out / name)
    with tempfile.TemporaryDirectory() as tmp:  # only the weights: config and tokenizer stay as carried
        dequantized_model(gguf).save_pretrained(tmp)
        for weights in Path(tmp).glob("*.safetensors"):
            shutil.move(weights, out / weights.name)
    record = out / "source_gguf.json"
    if record.exists():  # the source now lies here
        record.write_text(json.dumps(json.loads(record.read_text()) | {"path": str(gguf)}, indent=1) + "\n")
    print(f"{out}: transformers folder rebuilt from {gguf.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack")
    packing.add_argument("name", help="a packaged model (tunepipe.tasks.model.packaged.PACKAGED)")
    packing.add_argument("out", type=Path)
    packing.add_argument("--part-mib", type=int, default=60)
    unpacking = commands.add_parser("unpack")
    unpacking.add_argument("parts_dir", type=Path, help="the packed folder, every part gathered in it")
    unpacking.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.name, args.out, args.part_mib)
    else:
        unpack(args.parts_dir, args.out)


if __name__ == "__main__":
    main()
