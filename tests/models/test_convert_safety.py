"""Conversion and export never delete what meljax did not write (issue 28, items 1, 6, 9, 11).

A tiny synthetic llama GGUF (one layer, float32) stands in for a real one: converting it takes
milliseconds, so every case runs the real code path.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from meljax.commands.common import clean_errors, error_message, is_user_error
from meljax.models import convert_gguf, from_pretrained, output_folder, safetensors_io
from meljax.models import save_pretrained as save

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_tiny_gguf(path: str, seed: int = 0) -> str:
    """A one-layer llama GGUF (vocab 32, width 16) with random float32 weights."""
    import gguf

    rng = np.random.default_rng(seed)
    v, d, f, h, kv = 32, 16, 32, 4, 2
    hd = d // h
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(h)
    w.add_head_count_kv(kv)
    w.add_context_length(64)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(v)
    shapes = {
        "token_embd.weight": (v, d),
        "output_norm.weight": (d,),
        "blk.0.attn_norm.weight": (d,),
        "blk.0.ffn_norm.weight": (d,),
        "blk.0.attn_q.weight": (h * hd, d),
        "blk.0.attn_k.weight": (kv * hd, d),
        "blk.0.attn_v.weight": (kv * hd, d),
        "blk.0.attn_output.weight": (d, h * hd),
        "blk.0.ffn_gate.weight": (f, d),
        "blk.0.ffn_up.weight": (f, d),
        "blk.0.ffn_down.weight": (d, f),
    }
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_tiny_gguf(str(tmp_path / "tiny.gguf"))


def embed(folder) -> np.ndarray:
    return np.asarray(
        safetensors_io.SafetensorsFolder(str(folder)).get("model.embed_tokens.weight")
    )


def staging_left(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(".convert-")]


# ------------------------------------------------------------------ item 1: nothing deleted


def test_convert_refuses_a_non_empty_output_and_keeps_the_users_files(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("x")
    source = write_tiny_gguf(str(keep / "model.gguf"))  # the source sits in the output folder
    with pytest.raises(ValueError, match=r"keep is not empty \(model.gguf, notes.txt\).*--overw"):
        convert_gguf(source, str(keep), with_tokenizer=False)
    assert sorted(os.listdir(keep)) == ["model.gguf", "notes.txt"]
    convert_gguf(source, str(keep), with_tokenizer=False, overwrite=True)
    assert (keep / "notes.txt").read_text() == "x"
    assert os.path.exists(source)
    assert output_folder.read_manifest(str(keep)) == {"config.json", "model.safetensors"}
    assert from_pretrained(str(keep)).cfg.num_layers == 1
    assert staging_left(tmp_path) == []


def test_cli_convert_demo_onto_a_folder_with_notes_exits_2_and_keeps_them(tmp_path):
    pytest.importorskip("gguf")
    from meljax.models import demo_gguf_path

    try:
        demo_gguf_path()
    except FileNotFoundError:
        pytest.skip("the demo GGUF package is not installed")
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("x")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "meljax", "convert", "--source=demo", f"--output={keep}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is not empty (notes.txt); pass --overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert os.listdir(keep) == ["notes.txt"] and staging_left(tmp_path) == []


def test_convert_refuses_its_source_folder_as_output(tiny_gguf, tmp_path):
    from meljax.commands.convert import convert

    hf = convert_gguf(tiny_gguf, str(tmp_path / "hf"), with_tokenizer=False)
    before = sorted(os.listdir(hf))
    with pytest.raises(ValueError, match="is the --source folder"):
        convert(hf, hf, dtype="bfloat16", overwrite=True)
    assert sorted(os.listdir(hf)) == before


# ------------------------------------------------------------ item 6: no stale shards mixed in


def test_overwrite_removes_the_shards_meljax_wrote_and_loads_the_new_model(tiny_gguf, tmp_path):
    a = convert_gguf(tiny_gguf, str(tmp_path / "a"), with_tokenizer=False)
    other = write_tiny_gguf(str(tmp_path / "other.gguf"), seed=1)
    b = convert_gguf(other, str(tmp_path / "b"), with_tokenizer=False)
    out = tmp_path / "out"
    save(from_pretrained(a), str(out), max_shard_bytes=2048)
    assert safetensors_io.INDEX_FILE in os.listdir(out)
    (out / "notes.txt").write_text("x")
    save(from_pretrained(b), str(out), overwrite=True)  # one file now: the index must go
    names = sorted(os.listdir(out))
    assert names == [".meljax-manifest.json", "config.json", "model.safetensors", "notes.txt"]
    np.testing.assert_array_equal(embed(out), embed(b))
    assert not np.array_equal(embed(out), embed(a))


def test_overwrite_refuses_weights_meljax_did_not_write(tiny_gguf, tmp_path):
    a = convert_gguf(tiny_gguf, str(tmp_path / "a"), with_tokenizer=False)
    out = tmp_path / "out"
    save(from_pretrained(a), str(out), max_shard_bytes=2048)
    os.remove(out / output_folder.MANIFEST)  # as if transformers had written the folder
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    with pytest.raises(
        ValueError, match=r"holds config.json, model-00001-of-0.*not written by meljax"
    ):
        convert_gguf(tiny_gguf, str(out), with_tokenizer=False, overwrite=True)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_a_manifest_never_reaches_outside_its_folder(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    convert_gguf(tiny_gguf, str(out), with_tokenizer=False)
    (tmp_path / "victim.txt").write_text("x")
    (out / output_folder.MANIFEST).write_text(json.dumps({"files": ["../victim.txt", "/etc"]}))
    assert output_folder.read_manifest(str(out)) == set()
    with pytest.raises(ValueError, match="not written by meljax"):
        convert_gguf(tiny_gguf, str(out), with_tokenizer=False, overwrite=True)
    assert (tmp_path / "victim.txt").exists()


def test_the_runs_export_is_replaced_on_rerun_and_keeps_other_files(tiny_gguf, tmp_path):
    from flax import nnx

    from meljax.trainer.loop import _export

    hf = convert_gguf(tiny_gguf, str(tmp_path / "hf"), with_tokenizer=False)
    graphdef, params = nnx.split(from_pretrained(hf))
    workdir = str(tmp_path / "run")
    export = _export(graphdef, params, None, workdir, "", True)
    (tmp_path / "run" / "export" / "notes.txt").write_text("x")
    assert _export(graphdef, params, None, workdir, "bfloat16", True) == export
    # an export of an older meljax (no manifest) with a stale shard: adopted and replaced
    os.remove(os.path.join(export, output_folder.MANIFEST))
    stale = os.path.join(export, "model-00002-of-00002.safetensors")
    open(stale, "wb").close()
    _export(graphdef, params, None, workdir, "", True)
    assert sorted(os.listdir(export)) == [
        ".meljax-manifest.json",
        "config.json",
        "model.safetensors",
        "notes.txt",
    ]
    assert from_pretrained(export).cfg.num_layers == 1


# ----------------------------------------------------- item 9: a bad file names file and tensor


def _truncate_data(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)


def _truncate_header(path):
    with open(path, "r+b") as f:
        f.truncate(40)


def _garble_header(path):
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"{not json")


def _wrong_shape(path):
    with open(path, "r+b") as f:
        raw = f.read().replace(b'"shape":[16]', b'"shape":[17]', 1)
        f.seek(0)
        f.write(raw)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_truncate_data, r"tensor model\.\S+: its data ends at byte \d+ .*\(truncated file\?\)"),
        (_truncate_header, r"truncated safetensors file: its header needs \d+ bytes"),
        (_garble_header, r"unreadable safetensors header"),
        (_wrong_shape, r"tensor model\.\S+: 64 bytes for shape \[17\] of F32 \(68 expected\)"),
    ],
)
def test_a_corrupt_safetensors_file_is_one_line_naming_the_file(
    tiny_gguf, tmp_path, capsys, corrupt, message
):
    hf = convert_gguf(tiny_gguf, str(tmp_path / "hf"), with_tokenizer=False)
    file = os.path.join(hf, "model.safetensors")
    corrupt(file)
    with pytest.raises(ValueError, match=message) as e:
        from_pretrained(hf)
    assert str(e.value).startswith(f"{file}: ") and is_user_error(e.value)
    with pytest.raises(SystemExit) as exit_, clean_errors("convert"):
        from_pretrained(hf)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == f"meljax convert: error: {e.value}"


# ------------------------------------------- item 11: no hidden leftovers, quotes kept in errors


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_next_convert_removes_abandoned_staging_folders(tiny_gguf, tmp_path):
    tag = output_folder._host_tag()
    old = time.time() - output_folder.STALE_AFTER_S - 60
    folders = {
        f".convert-{_dead_pid()}-{tag}-abcd1234": False,  # killed on this host
        ".convert-k3x9_q2m": False,  # an older meljax's mkdtemp name, hours old
        f".convert-{os.getpid()}-{tag}-live1234": True,  # a conversion still running
        ".convert-1-0123abcd-otherhost": True,  # another host's, recent: maybe running
        ".convert-notes": True,  # not a meljax name: the user's
    }
    for name in folders:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 100)
    os.utime(tmp_path / ".convert-k3x9_q2m", (old, old))
    convert_gguf(tiny_gguf, str(tmp_path / "out"), with_tokenizer=False)
    assert sorted(staging_left(tmp_path)) == sorted(n for n, kept in folders.items() if kept)


def test_an_interrupted_convert_leaves_no_staging_folder(tiny_gguf, tmp_path, monkeypatch):
    from meljax.models import gguf_import

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "gguf_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tiny_gguf, str(tmp_path / "out"), with_tokenizer=False)
    assert staging_left(tmp_path) == [] and not (tmp_path / "out").exists()


def test_the_error_printer_keeps_the_messages_quotes(tmp_path, capsys):
    missing = str(tmp_path / "missing.safetensors")
    with pytest.raises(SystemExit) as e, clean_errors("convert"):
        safetensors_io.read_header(missing)
    assert e.value.code == 2
    assert f"No such file or directory: '{missing}'\n" in capsys.readouterr().err
    assert error_message(KeyError("model.nme")) == "model.nme"
    assert error_message(ValueError("'a b' is not a path")) == "'a b' is not a path"
