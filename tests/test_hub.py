"""--push_to_hub: the folder that would be uploaded is the real exported model; only the network calls are mocked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines import SamplerPipeline
from training import train
from training.hub import redact_argv
from tests.test_training import base_args, tiny_config  # noqa: F401  (fixture)

SECRET = "hf_THIS_IS_A_SECRET_TOKEN"


class FakeHub:
    """Stands in for the Hub's HTTP API: records create_repo and snapshots the folder upload_folder is given."""

    def __init__(self, fail: bool = False):
        self.calls, self.uploaded, self.fail = [], {}, fail

    def install(self, monkeypatch):
        import huggingface_hub

        hub = self

        def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None, **kw):
            hub.calls.append(("create_repo", repo_id, private, self.token))
            if hub.fail:
                raise ConnectionError("offline")

        def upload_folder(self, repo_id, folder_path, commit_message=None, repo_type=None, **kw):
            hub.calls.append(("upload_folder", repo_id, folder_path))
            hub.uploaded = {str(p.relative_to(folder_path)): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        return self


def test_push_to_hub_uploads_the_exported_model_and_never_writes_the_token(tmp_path, tiny_config, monkeypatch, capsys):  # noqa: F811
    hub = FakeHub().install(monkeypatch)
    out = tmp_path / "run"
    assert train.main(base_args(out, tiny_config, "--max_train_steps", "3", "--checkpointing_steps", "0", "--push_to_hub",
                                "--hub_model_id", "someone/mnist-tiny", "--hub_private_repo", "--hub_token", SECRET)) == 0
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][1:] == ("someone/mnist-tiny", True, SECRET)  # the token reaches the API, and only the API
    assert hub.calls[1][2] == str(out / "model")
    assert {"model_index.json", "README.md", "training_args.json", "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"} <= set(hub.uploaded)
    card = hub.uploaded["README.md"].decode()
    assert "accelerate launch training/train.py" in card and "--hub_token REDACTED" in card and "weights SHA-256" in card
    assert json.loads(hub.uploaded["training_args.json"])["hub_token"] == "REDACTED"
    for path in out.rglob("*"):  # nothing the run wrote holds the token
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err and "pushed" in captured.out
    SamplerPipeline.from_pretrained(str(out / "model"))  # what was uploaded is a loadable checkpoint


def test_a_failed_push_says_why_and_keeps_the_model(tmp_path, tiny_config, monkeypatch):  # noqa: F811
    FakeHub(fail=True).install(monkeypatch)
    out = tmp_path / "offline"
    with pytest.raises(train.TrainingError, match=r"could not upload .*ConnectionError: offline.*kept in"):
        train.main(base_args(out, tiny_config, "--max_train_steps", "2", "--checkpointing_steps", "0", "--push_to_hub",
                             "--hub_model_id", "someone/x"))
    assert (out / "model" / "model_index.json").exists()


def test_redact_argv_hides_both_forms():
    assert redact_argv(["--hub_token", "abc", "--seed", "1"]) == ["--hub_token", "REDACTED", "--seed", "1"]
    assert redact_argv(["--hub_token=abc"]) == ["--hub_token=REDACTED"]
