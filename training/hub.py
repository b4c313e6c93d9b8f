"""Publishing a trained model on the Hugging Face Hub, the way diffusers' training examples do.

``--push_to_hub`` uploads ``<output_dir>/model`` (weights, scheduler, model card with the command
and measured loss, ``training_args.json``) to ``--hub_model_id`` (default: the output folder's
name under the token's user), creating the repo if needed, private with ``--hub_private_repo``.
``--hub_token`` is never written anywhere: it is removed from the recorded arguments and command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

SECRET_ARGS = ("--hub_token",)


def redact_argv(argv: list) -> list:
    """The command line with the value of every secret argument replaced by ``REDACTED``."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("REDACTED")
            hide = False
            continue
        name, eq, _ = arg.partition("=")
        if name in SECRET_ARGS:
            if eq:
                out.append(f"{name}=REDACTED")
            else:
                out.append(arg)
                hide = True
            continue
        out.append(arg)
    return out


def redact_args(args: dict) -> dict:
    """Resolved arguments without the secret ones."""
    return {k: ("REDACTED" if v is not None else None) if f"--{k}" in SECRET_ARGS else v for k, v in args.items()}


def push_model(folder: Path, repo_id: Optional[str], private: bool = False, token: Optional[str] = None,
               commit_message: str = "Upload model trained with the diffusion sampler lab") -> str:
    """Create (if needed) the model repo and upload ``folder``; returns the repo id.

    Raises:
        RuntimeError: with a message that names the repo and the likely fix (login, network, name).
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        if not repo_id:
            repo_id = f"{api.whoami()['name']}/{Path(folder).parent.name}"
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, repo_type="model")
    except Exception as err:  # offline, not logged in, no rights, bad name …
        first = str(err).splitlines()[0] if str(err) else ""
        raise RuntimeError(f"--push_to_hub: could not upload {folder} to {repo_id or '(your user)/…'} "
                           f"({type(err).__name__}: {first}); log in with `huggingface-cli login` or pass "
                           "--hub_token, and check the network and --hub_model_id") from err
    return repo_id
