"""Checkpoint conversion robustness: corrupted tensor data, partial outputs of killed conversions, progress."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from openlm_mamba import MambaLM
from openlm_mamba.cli import main as cli_main
from openlm_mamba.convert import ConversionError, common, convert, hf, hf_config, load_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = MambaLM("mamba_tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def _epoch_ckpt(model: MambaLM, path: Path, optimizer: bool = False) -> Path:
    """An OpenLM epoch checkpoint as open_lm.main writes it (optionally with optimizer state after the weights)."""
    ckpt = {"epoch": 1, "step": 5, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}
    if optimizer:
        ckpt["optimizer"] = {"state": {0: {"exp_avg": torch.randn(300, 300)}}, "param_groups": [{"lr": 1e-3}]}
    torch.save(ckpt, path)
    return path


def _data_records(path: Path) -> list[tuple[str, int, int]]:
    """(name, offset of the bytes in the file, size) of each tensor record of a torch.save file."""
    out = []
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            if "/data/" in info.filename:
                f.seek(info.header_offset)
                n, m = struct.unpack("<HH", f.read(30)[26:30])
                out.append((info.filename, info.header_offset + 30 + n + m, info.file_size))
    return out


def _flip(path: Path, record: str | None = None, nbytes: int = 5000) -> str:
    """Overwrite ``nbytes`` in the middle of a tensor record's data (the largest one by default) with 0xff."""
    records = _data_records(path)
    name, offset, size = next(r for r in records if r[0] == record) if record else max(records, key=lambda r: r[2])
    n = min(nbytes, size)
    start = offset + (size - n) // 2
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\xff" * n)
    return name


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# -- corrupted tensor data ---------------------------------------------------------------------------------
def _record_of(path: Path, key: str) -> str:
    """The record holding state dict entry ``key`` (one before the tied lm_head, the only shared storage)."""
    sd = torch.load(path, weights_only=True)["state_dict"]
    # torch.save numbers records in the order it meets the storages: the state dict's order here
    return next(r for r, _, _ in _data_records(path) if r.endswith(f"/data/{list(sd).index(key)}"))


@pytest.mark.parametrize("key", ["backbone.layers.1.mixer.in_proj.weight", "backbone.embedding.weight"])
@pytest.mark.parametrize("to", ["hf", "openlm", "mamba_ssm"])
def test_corrupted_tensor_data_raises_and_writes_nothing(tiny, tmp_path, to, key, capsys):
    src = _epoch_ckpt(tiny, tmp_path / "flip.pt")
    record = _flip(src, _record_of(src, f"module.model.{key}"), nbytes=5000)
    dst = tmp_path / ("out.pt" if to == "openlm" else "out")
    with pytest.raises(ConversionError) as e:
        convert(src, dst, to=to, model="mamba_tiny", progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{src}: ") and f"record {record}" in msg and "corrupted" in msg and "CRC32" in msg
    assert "\n" not in msg
    assert not dst.exists() and not _leftovers(tmp_path)
    assert cli_main(["convert", str(src), str(dst), "--to", to, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"record {record}" in err and "wrote" not in err
    assert not dst.exists() and not _leftovers(tmp_path)


def test_load_model_rejects_corrupted_small_record(tiny, tmp_path):
    """A few bytes of a small tensor (D of layer 1) are enough; the message names the tensor."""
    src = _epoch_ckpt(tiny, tmp_path / "e.pt")
    key = "module.model.backbone.layers.1.mixer.D"
    record = _flip(src, _record_of(src, key), nbytes=8)
    with pytest.raises(ConversionError, match=rf"tensor '{key}' \(record {record}\) is corrupted"):
        load_model(src)


def test_corrupted_pickled_structure_is_detected(tiny, tmp_path):
    """The data.pkl record says which storage each tensor reads: pointing a tensor at another tensor's storage of
    the same shape (it would load, silently wrong) fails its CRC32 check."""
    src = _epoch_ckpt(tiny, tmp_path / "e.pt")
    sd = torch.load(src, weights_only=True)["state_dict"]
    names = list(sd)[: next(i for i, k in enumerate(sd) if "lm_head" in k)]  # _record_of holds before the tied head
    storage_key = {k: _record_of(src, k).rsplit("/", 1)[1] for k in names}
    k0, k1 = next(
        (storage_key[a], storage_key[b])
        for a in names
        for b in names
        if sd[a].shape == sd[b].shape and len(storage_key[a]) == len(storage_key[b]) and not torch.equal(sd[a], sd[b])
    )
    with open(src, "rb") as f, zipfile.ZipFile(f) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data.pkl"))
        f.seek(info.header_offset)
        n, m = struct.unpack("<HH", f.read(30)[26:30])
        offset = info.header_offset + 30 + n + m
        pkl = zf.read(info)
    key = b"X" + struct.pack("<I", len(k0)) + k0.encode()  # the storage key, a pickled str
    assert pkl.count(key) == 1
    with open(src, "r+b") as f:
        f.seek(offset + pkl.index(key) + 5)
        f.write(k1.encode())
    with pytest.raises(ConversionError, match=r"the pickled structure \(data\.pkl record\) is corrupted"):
        load_model(src)


def test_corrupted_weights_in_hf_and_mamba_ssm_bin_files(tiny, tmp_path):
    src = _epoch_ckpt(tiny, tmp_path / "e.pt")
    convert(src, tmp_path / "ssm", to="mamba_ssm", model="mamba_tiny", progress=False)
    _flip(tmp_path / "ssm" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin: tensor .* is corrupted"):
        load_model(tmp_path / "ssm")
    hf = tmp_path / "hfbin"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(hf_config(tiny.cfg)))
    sd = {k.removeprefix("model.").replace("embedding.", "embeddings."): v for k, v in tiny.state_dict().items()}
    torch.save(sd, hf / "pytorch_model.bin")
    assert torch.equal(load_model(hf).model.backbone.norm_f.weight, tiny.model.backbone.norm_f.weight)
    _flip(hf / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="is corrupted"):
        convert(hf, tmp_path / "out.pt", to="openlm", progress=False)
    assert not (tmp_path / "out.pt").exists()


def test_views_of_one_flat_buffer_are_checked(tiny, tmp_path):
    """FSDP-style: every tensor a view into one flat storage; loads intact, fails once the buffer is damaged."""
    state = tiny.state_dict()
    state.pop("model.lm_head.weight")  # tied
    flat = torch.cat([v.reshape(-1) for v in state.values()])
    sd, at = {}, 0
    for k, v in state.items():
        sd[k] = flat[at : at + v.numel()].view(v.shape)
        at += v.numel()
    torch.save({"state_dict": sd}, tmp_path / "flat.pt")
    assert len(_data_records(tmp_path / "flat.pt")) == 1
    x = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "flat.pt")(x)[0], tiny(x)[0])
    _flip(tmp_path / "flat.pt")
    with pytest.raises(ConversionError, match="is corrupted"):
        load_model(tmp_path / "flat.pt")


def test_only_records_of_used_tensors_are_checked(tiny, tmp_path):
    """Damaged optimizer state (after the weights in the file) does not block converting the weights; damaged
    weights in the same file do."""
    src = _epoch_ckpt(tiny, tmp_path / "e.pt", optimizer=True)
    records = _data_records(src)
    assert max(records, key=lambda r: r[2]) == records[-1]  # the optimizer's 300x300 exp_avg
    _flip(src, records[-1][0])
    convert(src, tmp_path / "back.pt", to="openlm", model="mamba_tiny", progress=False)
    back = torch.load(tmp_path / "back.pt", weights_only=True)["state_dict"]
    for k, v in tiny.state_dict().items():
        assert torch.equal(back[k], v), k
    _flip(src, records[0][0])  # the embedding
    with pytest.raises(ConversionError, match=rf"record {records[0][0]}\) is corrupted"):
        convert(src, tmp_path / "back2.pt", to="openlm", model="mamba_tiny", progress=False)


def test_records_are_streamed_when_storages_cannot_be_mapped(tiny, tmp_path, monkeypatch):
    """Without the mmap address -> record mapping, every record is checked from the file before anything is read."""
    monkeypatch.setattr(common, "_map_storages", lambda storages, records: None)
    src = _epoch_ckpt(tiny, tmp_path / "e.pt")
    convert(src, tmp_path / "ok", to="hf", model="mamba_tiny", progress=False)
    record = _flip(src)
    with pytest.raises(ConversionError, match=rf"e\.pt: record {record} is corrupted: CRC32"):
        convert(src, tmp_path / "out", to="hf", model="mamba_tiny", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_storage_mapping_matches_records(tiny, tmp_path):
    """The mmap address arithmetic maps each storage to its own record (checked against record sizes and order)."""
    src = _epoch_ckpt(tiny, tmp_path / "e.pt", optimizer=True)
    obj, check = common.torch_load(src)
    assert isinstance(check, common._MmapCheck)
    sd = obj["state_dict"]
    by_name = {r.name: r for r in check.mapping.values()}
    assert len(by_name) == len(_data_records(src))
    for i, key in enumerate(sd):
        if key.endswith("lm_head.weight"):
            continue  # shares the embedding's storage
        record = check.mapping[sd[key].untyped_storage().data_ptr()]
        assert record.name.endswith(f"/data/{i}") and record.size == sd[key].nbytes, key


# -- partial outputs of killed conversions ---------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_partials_of_dead_processes_are_removed(tiny, tmp_path, caplog):
    src = _epoch_ckpt(tiny, tmp_path / "e.pt")
    out = tmp_path / "out"
    dead, live, host = _dead_pid(), os.getppid(), common._HOST
    names = {
        f".out.partial-{dead}": False,  # older naming, no host: treated as this host's
        f".out.partial-{host}-{dead}": False,
        f".out.partial-{host}-{live}": True,  # a running conversion
        f".out.partial-{live}": True,
        f".out.partial-other-node-{dead}": True,  # another machine's (shared filesystem): its PID means nothing here
        f".other.partial-{host}-{dead}": True,  # another destination
        f".out.partial-{host}-{dead}x": True,  # not our naming
        f".out.old-{dead}": True,
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / f".out.pt.partial-{host}-{dead}").write_bytes(b"x")  # a file partial, for dst out.pt
    with caplog.at_level("WARNING", logger="openlm_mamba.convert.common"):
        convert(src, out, to="hf", model="mamba_tiny", progress=False)
    assert (out / "model.safetensors").is_file()
    for name, kept in names.items():
        assert (tmp_path / name).exists() == kept, name
    assert (tmp_path / f".out.pt.partial-{host}-{dead}").exists()
    assert sum("interrupted conversion" in r.getMessage() for r in caplog.records) == 2
    convert(src, tmp_path / "out.pt", to="openlm", model="mamba_tiny", progress=False)
    assert not (tmp_path / f".out.pt.partial-{host}-{dead}").exists()


KILLED_CONVERSION = """
import os, signal, sys
from openlm_mamba.convert import convert, hf
real = hf.write_safetensors
def write_then_die(path, *args, **kwargs):  # SIGKILL after the first shard is written
    real(path, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
hf.write_safetensors = write_then_die
convert(sys.argv[1], sys.argv[2], to="hf", model="mamba_tiny", shard_size="100KB", progress=False)
"""


def test_partial_output_of_sigkilled_conversion_is_removed_by_the_next(tiny, tmp_path):
    src = _epoch_ckpt(tiny, tmp_path / "e.pt")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_CONVERSION, str(src), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()
    left = _leftovers(tmp_path)
    assert left == [f".out.partial-{common._HOST}-{proc.pid}"]
    assert any((tmp_path / left[0]).glob("model-*.safetensors")) and not out.exists()
    convert(src, out, to="hf", model="mamba_tiny", shard_size="100KB", progress=False)
    assert _leftovers(tmp_path) == [] and (out / "model.safetensors.index.json").is_file()


# -- progress bar -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("to", ["hf", "openlm"])
def test_progress_bar_in_a_log_ends_at_100_percent(tiny, tmp_path, capsys, to):
    """stderr is not a terminal under capsys: the bar's last state stays, and it counts the bytes written."""
    src = _epoch_ckpt(tiny, tmp_path / "e.pt")
    dst = tmp_path / ("out.pt" if to == "openlm" else "out")
    convert(src, dst, to=to, model="mamba_tiny", dtype="bfloat16", progress=True)
    err = capsys.readouterr().err
    last = [s for s in err.replace("\n", "\r").split("\r") if s.strip()][-1]
    assert last.startswith(f"convert -> {to}: 100%") and "192k/192k" in last, repr(err)


# -- failures to write the output ----------------------------------------------------------------------------
READ_ONLY = "cannot write: Read-only file system"
NO_SPACE = "no space left on device while writing"
WRITE_ERRORS = {  # what the writers raise -> what the error says
    "EROFS": (OSError(errno.EROFS, os.strerror(errno.EROFS)), READ_ONLY),
    "ENOSPC": (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), NO_SPACE),
    "torch EROFS": (
        RuntimeError(
            "[enforce fail at inline_container.cc:747] . open file failed because of errno 30 on fopen: "
            "Read-only file system, file path: out.pt"
        ),
        READ_ONLY,
    ),
    "torch short write": (
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 202944 vs 202896"),
        NO_SPACE,
    ),
}


def _out(tmp_path: Path, to: str) -> Path:
    """A destination two directories below tmp_path, neither of which exists yet."""
    return tmp_path / "new" / "deeper" / ("out.pt" if to == "openlm" else "out")


def _patch_writers(monkeypatch: pytest.MonkeyPatch, after_write) -> None:
    """Make torch.save and the safetensors writer call ``after_write(path)`` once they have written ``path``."""
    real_save, real_safetensors = torch.save, hf.write_safetensors

    def save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        after_write(Path(path))

    def write_safetensors(path, *args, **kwargs):
        real_safetensors(path, *args, **kwargs)
        after_write(Path(path))

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(hf, "write_safetensors", write_safetensors)


@pytest.mark.parametrize("error", list(WRITE_ERRORS))
@pytest.mark.parametrize("to", ["hf", "openlm", "mamba_ssm"])
def test_write_failures_are_conversion_errors_and_leave_nothing(tiny, tmp_path, monkeypatch, capsys, to, error):
    """A read-only or full filesystem: one ConversionError naming dst and the cause, no partial output, and the
    parent directories the conversion created removed again."""
    src = _epoch_ckpt(tiny, tmp_path / "e.pt")
    exc, message = WRITE_ERRORS[error]

    def fail(path: Path) -> None:
        raise exc

    _patch_writers(monkeypatch, fail)
    dst = _out(tmp_path, to)
    with pytest.raises(ConversionError) as e:
        convert(src, dst, to=to, model="mamba_tiny", progress=False)
    assert str(e.value).startswith(f"{dst}: {message}"), str(e.value)
    assert not (tmp_path / "new").exists() and _leftovers(tmp_path) == []
    assert cli_main(["convert", "--to", to, str(src), str(dst), "--no-progress"]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_unwritable_destinations(tiny, tmp_path, capsys):
    src = _epoch_ckpt(tiny, tmp_path / "e.pt")
    (tmp_path / "afile").write_text("a file, not a directory")
    for dst in (tmp_path / "afile" / "out", tmp_path / "afile" / "sub" / "out"):
        with pytest.raises(ConversionError, match=rf"cannot write: {re.escape(str(tmp_path / 'afile'))} is not a dir"):
            convert(src, dst, to="hf", progress=False)
        assert cli_main(["convert", "--to", "hf", str(src), str(dst), "--no-progress"]) == 2
        assert "is not a directory" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["afile", "e.pt"]
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here: the unwritable-filesystem half of this test needs it")
    with pytest.raises(ConversionError, match=r"cannot create directory /proc/openlm-mamba-test"):
        convert(src, "/proc/openlm-mamba-test/out", to="hf", progress=False)
    for to, dst in (("hf", "/proc/openlm-mamba-test"), ("openlm", "/proc/openlm-mamba-test.pt")):
        with pytest.raises(ConversionError, match=rf"^{dst}: cannot write: "):
            convert(src, dst, to=to, progress=False)


@pytest.mark.parametrize("to", ["hf", "openlm"])
def test_destination_appearing_during_the_conversion_is_not_replaced(tiny, tmp_path, monkeypatch, to):
    """Two conversions to one destination without --overwrite: the later one fails instead of replacing."""
    src = _epoch_ckpt(tiny, tmp_path / "e.pt")
    dst = tmp_path / ("out.pt" if to == "openlm" else "out")

    def other_conversion_finishes(path: Path) -> None:
        if to == "openlm":
            dst.write_bytes(b"the other conversion's output")
        else:
            dst.mkdir()
            (dst / "model.safetensors").write_bytes(b"the other conversion's output")

    _patch_writers(monkeypatch, other_conversion_finishes)
    with pytest.raises(ConversionError, match="appeared while converting"):
        convert(src, dst, to=to, model="mamba_tiny", progress=False)
    written = dst if to == "openlm" else dst / "model.safetensors"
    assert written.read_bytes() == b"the other conversion's output" and _leftovers(tmp_path) == []


def test_parent_directories_created_for_a_failed_conversion_are_removed(tiny, tmp_path):
    src = _epoch_ckpt(tiny, tmp_path / "flip.pt")
    _flip(src, _record_of(src, "module.model.backbone.layers.1.mixer.in_proj.weight"))  # found while writing
    (tmp_path / "kept").mkdir()
    for dst in (tmp_path / "a" / "b" / "out", tmp_path / "kept" / "c" / "out"):
        with pytest.raises(ConversionError, match="is corrupted"):
            convert(src, dst, to="hf", model="mamba_tiny", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["flip.pt", "kept"] and os.listdir(tmp_path / "kept") == []


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_terminated_conversion_leaves_nothing(tmp_path, sig):
    """SIGTERM (kill, timeout, a batch scheduler) and Ctrl-C while the output is being written: the CLI exits
    with 143 / 130 and removes its partial output (SIGKILL alone leaves one, for the next conversion to remove)."""
    torch.manual_seed(0)
    src = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in MambaLM("mamba_tiny").state_dict().items()}}, src)
    code = (
        "import os, signal, sys\n"
        "from openlm_mamba import cli\n"
        "real = os.replace\n"
        "def replace(a, b):  # the output is complete, about to be renamed into place\n"
        f"    os.kill(os.getpid(), signal.{sig})\n"
        "    real(a, b)\n"
        "os.replace = replace\n"
        f"sys.exit(cli.main(['convert', '--to', 'hf', '--no-progress', {str(src)!r}, {str(tmp_path / 'out')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == {"SIGTERM": 143, "SIGINT": 130}[sig], proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1.pt"], proc.stderr[-2000:]


def test_a_file_saved_without_checksums_loads(tiny, tmp_path, monkeypatch):
    """torch.save can skip the CRC32s (serialization config compute_crc32 = False: every CRC is 0): such a file is
    valid, just not checkable, and loads."""
    config = pytest.importorskip("torch.utils.serialization").config
    monkeypatch.setattr(config.save, "compute_crc32", False)
    src = _epoch_ckpt(tiny, tmp_path / "nocrc.pt")
    monkeypatch.undo()
    with zipfile.ZipFile(src) as zf:
        assert all(info.CRC == 0 for info in zf.infolist())
    model = load_model(src)
    for k, v in tiny.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


# -- destinations that change while converting; side-file names ------------------------------------------
def test_overwrite_keeps_what_appears_in_the_destination_while_converting(tiny, tmp_path, monkeypatch):
    """--overwrite replaces what the destination held when the conversion started: a file or folder someone puts
    there mid-run is not deleted (the conversion fails instead, the destination left as it is), and a destination
    that appears mid-run is not replaced wholesale."""
    src = _epoch_ckpt(tiny, tmp_path / "e.pt")
    out = tmp_path / "out"
    convert(src, out, to="hf", model="mamba_tiny", progress=False)
    before = sorted(p.name for p in out.iterdir())
    real = hf.write_safetensors

    def meanwhile(path, *args, **kwargs):  # someone writes into the destination while the output is written
        real(path, *args, **kwargs)
        (out / "notes.txt").write_text("precious")
        (out / "eval_results").mkdir(exist_ok=True)

    monkeypatch.setattr(hf, "write_safetensors", meanwhile)
    with pytest.raises(ConversionError, match=r"eval_results/, notes.txt appeared in it while converting; left as it"):
        convert(src, out, to="hf", model="mamba_tiny", overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "precious" and (out / "eval_results").is_dir()
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "eval_results", "notes.txt"])
    assert _leftovers(tmp_path) == []

    from openlm_mamba import convert as convert_module

    real_check = convert_module.check_destination

    def checked_then_written(dst, **kwargs):  # right after the destination was checked
        carry = real_check(dst, **kwargs)
        (dst / "late.txt").write_text("precious")
        return carry

    monkeypatch.setattr(hf, "write_safetensors", real)
    (out / "notes.txt").unlink()
    (out / "eval_results").rmdir()
    monkeypatch.setattr(convert_module, "check_destination", checked_then_written)
    with pytest.raises(ConversionError, match=r"late\.txt appeared in it while converting"):
        convert(src, out, to="hf", model="mamba_tiny", overwrite=True, progress=False)
    assert (out / "late.txt").read_text() == "precious"
    monkeypatch.setattr(convert_module, "check_destination", real_check)

    fresh = tmp_path / "fresh"

    def appears(path, *args, **kwargs):
        real(path, *args, **kwargs)
        fresh.mkdir(exist_ok=True)
        (fresh / "mine").write_text("x")

    monkeypatch.setattr(hf, "write_safetensors", appears)
    with pytest.raises(ConversionError, match="appeared while converting"):
        convert(src, fresh, to="hf", model="mamba_tiny", overwrite=True, progress=False)
    assert [p.name for p in fresh.iterdir()] == ["mine"] and _leftovers(tmp_path) == []


@pytest.mark.parametrize("to,name", [("hf", "a" * 245), ("openlm", "b" * 240 + ".pt")])
def test_a_destination_name_near_the_length_limit(tiny, tmp_path, to, name):
    """A destination whose own name fits the 255-byte limit but whose partial-output name would not: converted
    (the side files get a shortened, hashed name), not a raw 'File name too long' traceback."""
    src = _epoch_ckpt(tiny, tmp_path / "e.pt")
    dst = tmp_path / name
    convert(src, dst, to=to, model="mamba_tiny", progress=False)
    assert dst.exists() and _leftovers(tmp_path) == []
    convert(src, dst, to=to, model="mamba_tiny", overwrite=True, progress=False)
    got = load_model(dst).state_dict()
    for key, value in tiny.state_dict().items():
        assert torch.equal(got[key], value), key


def test_output_moved_aside_by_a_killed_overwrite_is_restored(tiny, tmp_path):
    """SIGKILL between moving the old output aside and moving the new one in leaves the old one under
    .<name>.old-<host>-<pid>: the next conversion to that destination puts it back first (or removes it when the
    new output did land)."""
    src = _epoch_ckpt(tiny, tmp_path / "e.pt")
    out = tmp_path / "out"
    convert(src, out, to="hf", model="mamba_tiny", progress=False)
    aside = tmp_path / common._side_name(out, "old", _dead_pid())
    os.replace(out, aside)
    assert common.remove_stale_partials(out) == [] and out.is_dir() and not aside.exists()
    for overwrite in (True, False):  # a real conversion: restored before the destination is checked
        (out / "tokenizer.json").write_text("{}")
        os.replace(out, aside)
        if overwrite:
            convert(src, out, to="hf", model="mamba_tiny", overwrite=True, progress=False)
            assert (out / "tokenizer.json").is_file()  # carried over from the restored output
        else:
            with pytest.raises(ConversionError, match="already exists"):
                convert(src, out, to="hf", model="mamba_tiny", progress=False)
        assert out.is_dir() and not aside.exists()
    os.replace(out, aside)  # in place (the README's `convert hf_dir hf_dir --overwrite`): the source itself comes back
    convert(out, out, to="hf", dtype="bfloat16", overwrite=True, progress=False)
    assert out.is_dir() and not aside.exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    convert(src, tmp_path / "copy", to="hf", model="mamba_tiny", progress=False)
    os.replace(tmp_path / "copy", aside)  # both there: the new output had landed
    assert common.remove_stale_partials(out) == [aside] and out.is_dir() and _leftovers(tmp_path) == []


def test_short_write_message_names_the_file_size_limit(tmp_path, monkeypatch):
    """torch.save's writer does not say why a write fell short: with a file-size limit set (ulimit -f), the error
    names it beside a full disk."""
    err = RuntimeError("[enforce fail at inline_container.cc:1] . unexpected pos 64 vs 32")
    monkeypatch.setattr(common, "_file_size_limit", lambda: 1_000_000)
    msg = str(common.write_error(tmp_path / "x.pt", err))
    assert "no space left on device while writing, or past this process's file size limit of 1,000,000 bytes" in msg
    monkeypatch.setattr(common, "_file_size_limit", lambda: None)
    assert "file size limit" not in str(common.write_error(tmp_path / "x.pt", err))
