"""Checkpoints as users have them: other layouts, tied heads, vocabulary changes, Hub ids and
model cards. Each case reported against streamvec has a regression test here; every input is
written by the real library (transformers, diffusers, safetensors, huggingface_hub's layout).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch

from streamvec.errors import CheckpointError
from streamvec.io.safetensors.checkpoint import resolve_checkpoint
from tests.conftest import assert_matches_float64, run_cli
from tests.families import FAMILIES, build_family, read_all


@pytest.fixture(scope="session")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tied Qwen3 (tie_word_embeddings) base and fine-tunes, saved by save_pretrained."""
    return build_family(tmp_path_factory.mktemp("qwen3"), FAMILIES["qwen3"])


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_family(tmp_path_factory.mktemp("llama"), FAMILIES["mistral"])


def _edit64(base: np.ndarray, ft: np.ndarray, w: float) -> tuple[np.ndarray, np.ndarray]:
    b, f = base.astype(np.float64), ft.astype(np.float64)
    return b + w * (f - b), np.abs(b) + w * (np.abs(f) + np.abs(b))


def _load_lm(path: Path, cls: str = "AutoModelForCausalLM") -> object:
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = getattr(transformers, cls).from_pretrained(
            str(path), output_loading_info=True
        )
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    return model


# -- layouts ----------------------------------------------------------------------------------


def test_diffusers_sharded_component_keeps_its_names(tmp_path: Path) -> None:
    import diffusers
    import torch

    fam = FAMILIES["vae"]
    torch.manual_seed(0)
    base = fam.build()
    base.save_pretrained(str(tmp_path / "base"), max_shard_size="20KB")
    ft = fam.build()
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.01)
    ft.save_pretrained(str(tmp_path / "ft"), max_shard_size="20KB")
    index = "diffusion_pytorch_model.safetensors.index.json"
    assert (tmp_path / "base" / index).is_file()  # diffusers wrote several shards
    out = tmp_path / "out"
    assert (
        run_cli("combine", "--base", tmp_path / "base", "-o", out, f"{tmp_path / 'ft'}:1", "-q")
        == 0
    )
    assert (out / index).is_file()
    assert not list(out.glob("model*"))
    loaded = diffusers.AutoencoderKL.from_pretrained(str(out))
    want = {k: v + 0.01 for k, v in base.state_dict().items()}
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=2e-7)


def test_mistral_folder_reads_model_safetensors_like_transformers(llama, tmp_path: Path) -> None:
    # Mistral releases ship consolidated.safetensors (mistral_inference's names) next to
    # model.safetensors (transformers' names); transformers loads model.safetensors.
    folders = {}
    for name in ("base", "ft1"):
        d = tmp_path / name
        shutil.copytree(llama[name], d)
        tensors = safetensors.torch.load_file(str(d / "model.safetensors"))
        native = {"tok_embeddings.weight": tensors["model.embed_tokens.weight"]}
        safetensors.torch.save_file(native, str(d / "consolidated.safetensors"))
        folders[name] = d
    files = resolve_checkpoint(folders["base"])
    assert [s.name for s in files.shards] == ["model.safetensors"]
    out = tmp_path / "out"
    assert run_cli("combine", "--base", folders["base"], "-o", out, folders["ft1"], "-q") == 0
    _load_lm(out)


def _sharded_llama(src: Path, dst: Path) -> Path:
    model = _load_lm(src)
    model.save_pretrained(str(dst), max_shard_size="3KB")  # type: ignore[attr-defined]
    assert (dst / "model.safetensors.index.json").is_file()
    return dst


def test_index_with_duplicated_and_unlisted_entries_is_read_like_transformers(
    llama, tmp_path: Path
) -> None:
    base = _sharded_llama(llama["base"], tmp_path / "base")
    ft = _sharded_llama(llama["ft1"], tmp_path / "ft")
    index_path = ft / "model.safetensors.index.json"
    doc = json.loads(index_path.read_text())
    weight_map = doc["weight_map"]
    unlisted = "model.norm.weight"
    shard_of = weight_map.pop(unlisted)
    # A duplicated key (JSON keeps the last) and a tensor the index no longer lists.
    first = next(iter(weight_map))
    body = json.dumps(doc, indent=1)
    dup = f'"{first}": "{weight_map[first]}",\n  '
    index_path.write_text(body.replace('"weight_map": {', '"weight_map": {' + dup, 1))
    assert shard_of in index_path.read_text()
    _load_lm(ft)  # transformers accepts both
    out = tmp_path / "tau.zarr"
    assert run_cli("diff", base, ft, "-o", out, "-q") == 0
    import streamvec as sv

    assert unlisted in sv.open(out)


def test_index_listing_a_tensor_no_shard_holds_is_refused(llama, tmp_path: Path) -> None:
    ft = _sharded_llama(llama["ft1"], tmp_path / "ft")
    index_path = ft / "model.safetensors.index.json"
    doc = json.loads(index_path.read_text())
    doc["weight_map"]["model.ghost.weight"] = next(iter(doc["weight_map"].values()))
    index_path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="model.ghost.weight.*randomly initialised"):
        resolve_checkpoint(ft)


def test_pipeline_root_is_refused_with_the_subfolders(tmp_path: Path, capsys) -> None:
    import torch

    pipe = tmp_path / "pipe"
    torch.manual_seed(0)
    FAMILIES["vae"].build().save_pretrained(str(pipe / "vae"))
    (pipe / "scheduler").mkdir()
    (pipe / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert run_cli("info", pipe) == 2
    err = capsys.readouterr().err
    assert "pipeline" in err and str(pipe / "vae") in err and "scheduler" not in err
    assert run_cli("info", pipe / "vae") == 0


# -- tied weights -----------------------------------------------------------------------------


def _with_head(src: Path, dst: Path, head_from: str = "model.embed_tokens.weight") -> Path:
    """The same checkpoint, storing lm_head.weight too (as older savers did)."""
    shutil.copytree(src, dst)
    tensors = safetensors.torch.load_file(str(dst / "model.safetensors"))
    tensors["lm_head.weight"] = tensors[head_from].clone()
    safetensors.torch.save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("stores_head", ["base", "finetuned"])
def test_tied_head_stored_by_one_checkpoint_only(qwen3, tmp_path: Path, stores_head: str) -> None:
    base, ft = qwen3["base"], qwen3["ft1"]
    assert "lm_head.weight" not in read_all(base)  # save_pretrained leaves the tied head out
    if stores_head == "base":
        base = _with_head(base, tmp_path / "base")
    else:
        ft = _with_head(ft, tmp_path / "ft")
    out = tmp_path / "out"
    assert run_cli("combine", "--base", base, "-o", out, f"{ft}:0.5", "-q") == 0
    B, F, Out = read_all(qwen3["base"]), read_all(qwen3["ft1"]), read_all(out)
    emb = "model.embed_tokens.weight"
    exact, mag = _edit64(B[emb], F[emb], 0.5)
    assert_matches_float64(Out[emb], exact, mag, 3, emb)
    if "lm_head.weight" in Out:  # kept where the base stores it: the same edit
        np.testing.assert_array_equal(Out["lm_head.weight"], Out[emb])
    model = _load_lm(out)
    head = model.lm_head.weight.float().detach().numpy()  # type: ignore[attr-defined]
    np.testing.assert_array_equal(head, Out[emb].astype(np.float32))


def test_untied_head_in_a_finetune_of_a_tied_base_is_refused(qwen3, tmp_path: Path, capsys) -> None:
    ft = _with_head(qwen3["ft1"], tmp_path / "ft", head_from="model.norm.weight")
    # Make the stored head differ from the embedding (a head trained apart).
    tensors = safetensors.torch.load_file(str(ft / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] * 2
    safetensors.torch.save_file(tensors, str(ft / "model.safetensors"), metadata={"format": "pt"})
    assert run_cli("combine", "--base", qwen3["base"], "-o", tmp_path / "o", ft, "-q") == 2
    err = capsys.readouterr().err
    assert "lm_head.weight" in err and "--exclude lm_head.weight" in err
    assert "keep-base" not in err
    assert not (tmp_path / "o").exists()


# -- vocabulary changes -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def resized(qwen3, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tied Qwen3 base with tokenizer files, and a chat fine-tune that added 8 tokens."""
    root = tmp_path_factory.mktemp("resized")
    base = root / "base"
    shutil.copytree(qwen3["base"], base)
    (base / "tokenizer.json").write_text('{"marker": "base tokenizer"}')
    model = _load_lm(qwen3["ft1"])
    model.resize_token_embeddings(72)  # type: ignore[attr-defined]
    import torch

    with torch.no_grad():
        emb = model.get_input_embeddings().weight  # type: ignore[attr-defined]
        emb[64:] = torch.arange(8 * emb.shape[1], dtype=torch.float32).reshape(8, -1).to(emb.dtype)
    ft = root / "ft"
    model.save_pretrained(str(ft))  # type: ignore[attr-defined]
    (ft / "tokenizer.json").write_text('{"marker": "chat tokenizer"}')
    assert json.loads((ft / "config.json").read_text())["vocab_size"] == 72
    return {"base": base, "ft": ft}


def test_vocab_change_is_refused_naming_the_option(resized, tmp_path: Path, capsys) -> None:
    code = run_cli("combine", "--base", resized["base"], "-o", tmp_path / "o", resized["ft"], "-q")
    assert code == 2
    err = capsys.readouterr().err
    assert "--vocab" in err and "72" in err and err.count("\n") == 1


@pytest.mark.parametrize("policy", ["union", "base", "common"])
def test_vocab_policies(resized, tmp_path: Path, policy: str) -> None:
    out = tmp_path / "out"
    args = ("combine", "--base", resized["base"], "-o", out, f"{resized['ft']}:0.5")
    assert run_cli(*args, "--vocab", policy, "-q") == 0
    B, F, Out = read_all(resized["base"]), read_all(resized["ft"]), read_all(out)
    emb = "model.embed_tokens.weight"
    rows = 72 if policy == "union" else 64
    config = json.loads((out / "config.json").read_text())
    assert Out[emb].shape[0] == rows and config["vocab_size"] == rows
    tokenizer = (out / "tokenizer.json").read_text()
    assert ("chat" in tokenizer) == (policy == "union")
    exact, mag = _edit64(B[emb], F[emb][:64], 0.5)
    assert_matches_float64(Out[emb][:64], exact, mag, 3, emb)
    if policy == "union":  # added tokens come out as the fine-tune trained them
        np.testing.assert_array_equal(Out[emb][64:], F[emb][64:])
    model = _load_lm(out)
    assert model.get_input_embeddings().weight.shape[0] == rows  # type: ignore[attr-defined]
    assert "--vocab" in (out / "README.md").read_text() or policy in (out / "README.md").read_text()


def test_vocab_in_diff_and_merge_recipe(resized, tmp_path: Path) -> None:
    assert run_cli("diff", resized["base"], resized["ft"], "-o", tmp_path / "t.zarr", "-q") == 2
    tau = tmp_path / "t.zarr"
    assert run_cli("diff", resized["base"], resized["ft"], "-o", tau, "--vocab", "base", "-q") == 0
    # mergekit's tokenizer_source sets the policy; a lazy sum and a TIES merge both honour it.
    for method in ("task_arithmetic", "ties"):
        recipe = tmp_path / f"{method}.yaml"
        recipe.write_text(
            f"merge_method: {method}\nbase_model: {resized['base']}\ntokenizer_source: union\n"
            f"parameters: {{weight: 0.5, density: 0.5}}\nmodels:\n  - model: {resized['ft']}\n"
        )
        out = tmp_path / method
        assert run_cli("merge", recipe, "-o", out, "-q") == 0
        assert json.loads((out / "config.json").read_text())["vocab_size"] == 72
        assert "chat" in (out / "tokenizer.json").read_text()
        _load_lm(out)


# -- Hub ids ----------------------------------------------------------------------------------


def _hub_cache(root: Path, repo: str, folder: Path, sha: str) -> Path:
    """A cache laid out the way huggingface_hub lays it out (blobs linked from snapshots)."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / sha
    snap.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for f in folder.iterdir():
        if f.is_file():
            blob = repo_dir / "blobs" / f"{abs(hash((repo, f.name))):x}"
            shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(sha)
    return snap


def test_hub_ids_resolve_through_the_cache(
    qwen3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    cache = tmp_path / "hub"
    sha = "0123456789abcdef0123456789abcdef01234567"
    _hub_cache(cache, "acme/tiny-base", qwen3["base"], sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "edited"
    assert (
        run_cli("combine", "--base", "acme/tiny-base", "-o", out, f"{qwen3['ft1']}:0.5", "-q") == 0
    )
    card = (out / "README.md").read_text()
    assert "acme/tiny-base" in card and sha in card and "base_model: acme/tiny-base" in card
    assert (
        run_cli("diff", f"acme/tiny-base@{sha}", qwen3["ft1"], "-o", tmp_path / "t.zarr", "-q") == 0
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "merge_method: task_arithmetic\nbase_model: acme/tiny-base\n"
        f"parameters: {{weight: 0.5}}\nmodels:\n  - model: {qwen3['ft1']}\n"
    )
    assert run_cli("merge", recipe, "-o", tmp_path / "m", "-q") == 0
    np.testing.assert_array_equal(
        read_all(tmp_path / "m")["model.embed_tokens.weight"],
        read_all(out)["model.embed_tokens.weight"],
    )
    capsys.readouterr()
    assert run_cli("info", "acme/absent") == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and err.count("\n") == 1
    # A local path that exists always wins over the Hub.
    local = tmp_path / "acme" / "absent"
    shutil.copytree(qwen3["ft2"], local)
    assert run_cli("info", "acme/absent") == 0


# -- model cards ------------------------------------------------------------------------------


def test_model_card_says_where_the_output_came_from(qwen3, tmp_path: Path) -> None:
    from streamvec.version import __version__

    base = tmp_path / "base"
    shutil.copytree(qwen3["base"], base)
    (base / "README.md").write_text("# The base model's own card\n")
    out = tmp_path / "out"
    assert run_cli("combine", "--base", base, "-o", out, f"{qwen3['ft1']}:0.5", "-q") == 0
    card = (out / "README.md").read_text()
    manifest = json.loads((out / "streamvec.json").read_text())["streamvec"]
    assert "The base model's own card" not in card
    assert f"streamvec {__version__}" in card
    assert "streamvec combine --base" in card
    for source in manifest["sources"]:
        assert source["fingerprint"] in card
