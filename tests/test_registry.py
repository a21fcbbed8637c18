"""The encoder registry: one record per encoder, one constructor, sources named explicitly, no import cycle."""
import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine import backbones, cirtorch
from engine.backbones import file_format
from engine.errors import EngineError
from engine.models import ENCODERS, STUDENTS, TEACHERS, build, describe_registry, parse_source

REPO = Path(__file__).resolve().parents[1]


def test_every_entry_is_one_complete_record():
    assert list(ENCODERS) == [s.name for s in [*backbones.SPECS, *cirtorch.SPECS]]  # each declared once, by its family
    assert TEACHERS == ("effnet-lite2-gem", "resnet101-gem", "vgg16-gem")
    assert STUDENTS == ("effnet-lite0", "mobilenetv2", "resnet18", "effnet-b3")
    for s in ENCODERS.values():
        # a teacher has its own D; a student maps into its teacher's D through its head's linear map
        assert (s.role == "teacher") == (s.dim is not None) == (not s.head.projection), s.name
        assert s.weights.kind in ("package", "file", "cirtorch") and s.weights.detail
        assert (s.weights.locate is not None) == (s.weights.kind == "package")
    for s in cirtorch.SPECS:  # the download table and the registry are one record
        assert cirtorch.CIRTORCH_TEACHERS[s.name] == {"file": s.weights.file, "arch": s.arch, "sha256_prefix": s.weights.sha256_prefix}
        assert s.weights.file.split("-")[-1] == f"{s.weights.sha256_prefix}.pth"
        assert s.weights.url == cirtorch.BASE_URL + s.weights.file


@pytest.mark.parametrize("name", [n for n, s in ENCODERS.items() if s.weights.kind == "package"])
def test_packaged_weights_are_installed_and_fit_the_trunk(name):
    spec = ENCODERS[name]
    path = spec.weights.locate()
    trunk = spec.trunk(path)  # strict load: every tensor of the file has its place
    with torch.no_grad():
        fmap = trunk.eval()(torch.rand(1, 3, 64, 64))
    assert fmap.shape[1] == spec.channels


def test_build_asks_the_right_arguments_of_each_role():
    with pytest.raises(EngineError, match="unknown encoder 'alexnet'"):
        build("alexnet")
    with pytest.raises(EngineError, match="needs a target space"):
        build("mobilenetv2")
    with pytest.raises(EngineError, match="is a teacher"):
        build("effnet-lite2-gem", dim=64, space="s")
    with pytest.raises(EngineError, match="needs its checkpoint"):
        build("resnet101-gem")
    s = build("resnet18", "random", dim=32, space="t:1", teacher="t", seed=3)
    assert (s.dim, s.space, s.name, s.config["head_init"], s.config["pool_dim"]) == (32, "t:1", "resnet18->t", "random:3", 512)


def test_the_offline_teacher_keeps_its_space_id():
    # Recorded before the head had a projection slot: every store of this teacher on disk carries it.
    teacher = build("effnet-lite2-gem")
    assert teacher.space == "effnet-lite2-gem:d433a2f98ffd621e"
    assert teacher.head.project is None and [k for k in teacher.state_dict() if k.startswith("head.")] == ["head.p"]


def test_sources_are_named_or_read_from_the_file(tmp_path):
    ckpt, pth, legacy, other = tmp_path / "a.pth", tmp_path / "b.safetensors", tmp_path / "c", tmp_path / "d.safetensors"
    save_file({"x": torch.zeros(2)}, str(ckpt))  # suffixes that lie: the content decides
    torch.save({"x": torch.zeros(2)}, pth)
    torch.save({"x": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)  # the 2018 cirtorch files' format
    other.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00[not a header]")
    assert [file_format(p) for p in (ckpt, pth, legacy)] == ["safetensors", "torch", "torch"]
    assert parse_source(str(ckpt)) == ("checkpoint", str(ckpt))
    assert parse_source(pth) == ("cirtorch", str(pth))
    assert parse_source(str(legacy)) == ("cirtorch", str(legacy))
    assert parse_source("effnet-lite2-gem") == ("registry", "effnet-lite2-gem")
    assert parse_source("cirtorch:/x/y.safetensors") == ("cirtorch", "/x/y.safetensors")  # named: not read
    assert parse_source("checkpoint:rel/z") == ("checkpoint", "rel/z")
    with pytest.raises(EngineError, match="neither a safetensors file nor a torch") as e:
        parse_source(other)
    assert e.value.path == str(other)
    with pytest.raises(EngineError, match="unknown model 'nowhere.pth'"):
        parse_source("nowhere.pth")


def imports_of(path: Path) -> set[str]:
    """Every module a file of engine/ imports, at top level or inside functions (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = ".".join(filter(None, ["engine" if node.level else "", node.module]))
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
    return names


def test_family_modules_never_import_the_registry():
    for family in ("encoder", "backbones", "cirtorch"):
        assert "engine.models" not in imports_of(REPO / "engine" / f"{family}.py"), family
    assert {"engine.backbones", "engine.cirtorch", "engine.encoder"} <= imports_of(REPO / "engine" / "models.py")


def test_engine_models_lists_every_entry_with_its_weights(run_cli):
    code, out, _ = run_cli("models", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == [*TEACHERS, *STUDENTS]
    for r in rows:
        spec = ENCODERS[r["name"]]
        assert (r["role"], r["weights"], r["source"], r["dim"]) == (spec.role, spec.weights.kind, spec.weights.detail, spec.dim)
    assert rows == describe_registry()
    code, table, _ = run_cli("models")
    assert code == 0 and all(name in table for name in ENCODERS)
