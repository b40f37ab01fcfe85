"""Malformed inputs of every kind fail before heavy work, with one message naming the file/key/tensor, and leave
nothing behind (no output directory, no hidden temporary directory; an existing output stays intact).

Most cases drive the Python API (``merge_ops.api``: cheap, in-process); a representative handful run the real CLI
(``python -m pipelines.cli``) in a subprocess and check the exit status, the one-line message and that stderr holds
no Python traceback. tests/test_config_errors.py covers the config-level basics (unknown keys, ranges, arity); this
file covers corrupt files, broken directories, hostile YAML, broken adapters and the output side.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml
import torch
from safetensors.torch import load_file, save_file

from merge_ops.api import MergeOptions, merge, merge_lora, plan_merge
from merge_ops.errors import ConfigError, InputError, MergeError

ROOT = Path(__file__).resolve().parents[1]
TRACEBACK = "Traceback (most recent call last)"
Q0 = "model.layers.0.self_attn.q_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"


# -- helpers -----------------------------------------------------------------------------------------------------------
def opts(**kw) -> MergeOptions:
    return MergeOptions(**{"device": "cpu", "hash_inputs": False, **kw})


def linear_cfg(a: Path | str, b: Path | str, **extra) -> dict:
    cfg = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                                {"model": str(b), "parameters": {"weight": 0.5}}]}
    cfg.update(extra)
    return cfg


def leftovers(out: Path) -> list[Path]:
    """The output and any hidden temporary sibling of it (``.NAME.tmp-*``, ``.NAME.float-*``)."""
    return ([out] if out.exists() else []) + sorted(out.parent.glob(f".{out.name}.*"))


def expect_error(fn: Callable[[], object], *needles: str, exc: type[Exception] = MergeError,
                 out: Path | None = None) -> str:
    with pytest.raises(exc) as ei:
        fn()
    msg = str(ei.value)
    if os.environ.get("SHOW_MESSAGES"):
        print(f"\n[{type(ei.value).__name__}] {msg}")
    for n in needles:
        assert n in msg, f"{n!r} not in message: {msg}"
    if out is not None:
        assert leftovers(out) == [], leftovers(out)
    return msg


def st_read(f: Path) -> tuple[dict, bytes]:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_write(f: Path, header: dict | None, data: bytes, *, raw_header: bytes | None = None,
             length: int | None = None) -> None:
    hb = raw_header if raw_header is not None else json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(hb) if length is None else length) + hb + data)


@pytest.fixture()
def broken(tiny_family, tmp_path) -> Path:
    """A private copy of a fine-tune, to corrupt."""
    dst = tmp_path / "broken"
    shutil.copytree(tiny_family["ft1"], dst)
    return dst


def merge_broken(tiny_family, broken: Path, tmp_path: Path, *needles: str, exc=MergeError) -> str:
    out = tmp_path / "out"
    return expect_error(lambda: merge(linear_cfg(broken, tiny_family["ft2"]), out, opts()), *needles, exc=exc, out=out)


# -- safetensors files -------------------------------------------------------------------------------------------------
def _header_len(n):
    def mutate(f: Path):
        h, d = st_read(f)
        st_write(f, h, d, length=n(len(json.dumps(h)), len(d)))
    return mutate


def _raw_header(raw: bytes):
    def mutate(f: Path):
        _, d = st_read(f)
        st_write(f, None, d, raw_header=raw)
    return mutate


def _entry(fn):
    def mutate(f: Path):
        h, d = st_read(f)
        fn(h, len(d))
        st_write(f, h, d)
    return mutate


def _dup_name(f: Path):
    h, d = st_read(f)
    text = json.dumps(h)
    entry = json.dumps({Q0: h[Q0]})[1:-1]
    st_write(f, None, d, raw_header=(text[:-1] + ", " + entry + "}").encode())


def _set(key, value):
    return _entry(lambda h, n: h[Q0].__setitem__(key, value(h, n) if callable(value) else value))


def _delete(key):
    return _entry(lambda h, n: h[Q0].pop(key))


ST_CASES = {
    "header_len_past_eof": (_header_len(lambda hl, dl: hl + dl + 100), ["header length"]),
    "header_len_zero": (_header_len(lambda hl, dl: 0), ["header"]),
    "header_len_absurd": (_header_len(lambda hl, dl: 2**60), ["header length"]),
    "header_not_json": (_raw_header(b"{this is not json"), ["not valid JSON"]),
    "header_not_object": (_raw_header(b"[1, 2, 3]"), ["not a JSON object"]),
    "header_not_utf8": (_raw_header(b'{"\xff\xfe": 1}'), ["UTF-8"]),
    "entry_not_object": (_set("dtype", None), [Q0, "dtype"]),
    "missing_dtype": (_delete("dtype"), [Q0, "'dtype'"]),
    "missing_shape": (_delete("shape"), [Q0, "'shape'"]),
    "missing_offsets": (_delete("data_offsets"), [Q0, "'data_offsets'"]),
    "unknown_dtype": (_set("dtype", "F7"), [Q0, "F7"]),
    "shape_not_list": (_set("shape", "32x32"), [Q0, "shape"]),
    "negative_dims": (_set("shape", [-32, -32]), [Q0, "shape"]),
    "offsets_three_numbers": (_set("data_offsets", [0, 1, 2]), [Q0, "data_offsets"]),
    "offsets_past_eof": (_set("data_offsets", lambda h, n: [n - 100, n - 100 + 2048]), [Q0, "past the end"]),
    "offsets_reversed": (_set("data_offsets", lambda h, n: h[Q0]["data_offsets"][::-1]), [Q0, "reversed"]),
    "offsets_negative": (_set("data_offsets", [-2048, 0]), [Q0, "negative"]),
    "offsets_vs_shape": (_set("shape", [32, 16]), [Q0, "[32, 16]", "BF16"]),
    "overlapping": (_set("data_offsets", lambda h, n: h[Q1]["data_offsets"]), ["overlap", Q0, Q1]),
    "duplicate_tensor_name": (_dup_name, [Q0, "twice"]),
    "metadata_not_object": (_entry(lambda h, n: h.__setitem__("__metadata__", [1, 2])), ["__metadata__"]),
    "empty_file": (lambda f: f.write_bytes(b""), ["empty"]),
    "seven_bytes": (lambda f: f.write_bytes(b"\x01" * 7), ["shorter than 8 bytes"]),
}


@pytest.mark.parametrize("case", list(ST_CASES))
def test_corrupt_safetensors(tiny_family, broken, tmp_path, case):
    mutate, needles = ST_CASES[case]
    f = broken / "model.safetensors"
    mutate(f)
    merge_broken(tiny_family, broken, tmp_path, str(f), *needles, exc=InputError)


def test_safetensors_path_is_a_directory(tiny_family, broken, tmp_path):
    (broken / "model.safetensors").unlink()
    (broken / "model.safetensors").mkdir()
    merge_broken(tiny_family, broken, tmp_path, "model.safetensors", "is a directory", exc=InputError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_safetensors(tiny_family, broken, tmp_path):
    f = broken / "model.safetensors"
    f.chmod(0)
    try:
        merge_broken(tiny_family, broken, tmp_path, str(f), "cannot read", exc=InputError)
    finally:
        f.chmod(0o644)


def test_unreadable_safetensors_any_user(tiny_family, broken, tmp_path, monkeypatch):
    """The same as above where root would read anyway: the open() of the weights fails with EACCES."""
    import builtins
    import errno

    from merge_ops import safetensors_io

    f = broken / "model.safetensors"

    def fake_open(path, *a, **kw):
        if Path(path) == f:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return builtins.open(path, *a, **kw)

    monkeypatch.setattr(safetensors_io, "open", fake_open, raising=False)
    merge_broken(tiny_family, broken, tmp_path, str(f), "cannot read (Permission denied)", exc=InputError)


def test_valid_header_variants_still_load(tiny_family, broken, tmp_path):
    """Guards against over-strict checks: gaps between tensors and trailing bytes are harmless and accepted."""
    f = broken / "model.safetensors"
    h, d = st_read(f)
    st_write(f, h, d + b"\0" * 64)
    plan = plan_merge(linear_cfg(broken, tiny_family["ft2"]), opts())
    assert len(plan.tensors) == 21


# -- sharded checkpoints -----------------------------------------------------------------------------------------------
def make_sharded(src: Path, dst: Path) -> tuple[Path, dict]:
    """A two-shard copy of ``src`` with a proper index (layer 0 and the embeddings in shard 1, the rest in 2)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, dst / f.name)
    sd = load_file(str(src / "model.safetensors"))
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    parts = {n: {} for n in names}
    for k, v in sd.items():
        parts[names[0] if ("layers.0." in k or "embed" in k) else names[1]][k] = v
    for n, p in parts.items():
        save_file(p, str(dst / n), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: n for n, p in parts.items() for k in p}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst, index


def _index(fn):
    def mutate(d: Path, index: dict):
        fn(d, index)
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return mutate


def _in_two_shards(d: Path, index: dict):
    s2 = d / "model-00002-of-00002.safetensors"
    sd = load_file(str(s2))
    sd[Q0] = load_file(str(d / "model-00001-of-00002.safetensors"))[Q0]
    save_file(sd, str(s2))


SHARD_CASES = {
    "index_not_json": (lambda d, i: (d / "model.safetensors.index.json").write_text("{weight_map: nope"),
                       ["model.safetensors.index.json", "not valid JSON"]),
    "index_without_weight_map": (_index(lambda d, i: i.pop("weight_map")), ["model.safetensors.index.json",
                                                                          "weight_map"]),
    "weight_map_is_a_list": (_index(lambda d, i: i.__setitem__("weight_map", list(i["weight_map"]))),
                             ["model.safetensors.index.json", "weight_map"]),
    "weight_map_value_not_str": (_index(lambda d, i: i["weight_map"].__setitem__(Q0, 3)),
                                 ["model.safetensors.index.json", Q0]),
    "weight_map_escapes_dir": (_index(lambda d, i: i["weight_map"].__setitem__(Q0, "../ft2/model.safetensors")),
                               ["model.safetensors.index.json", "../ft2/model.safetensors"]),
    "tensor_not_in_named_shard": (_index(lambda d, i: i["weight_map"].__setitem__(Q0, "model-00002-of-00002.safetensors")),
                                  [Q0, "model-00002-of-00002.safetensors", "not there"]),
    "shard_missing": (lambda d, i: (d / "model-00002-of-00002.safetensors").unlink(),
                      ["missing", "model-00002-of-00002.safetensors"]),
    "tensor_in_two_shards": (_in_two_shards, [Q0, "model-00001-of-00002.safetensors",
                                              "model-00002-of-00002.safetensors"]),
    "index_and_single_file": (lambda d, i: shutil.copy2(d.parent / "orig.safetensors", d / "model.safetensors"),
                              ["model.safetensors", "model.safetensors.index.json", "both"]),
}


@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_broken_sharded_checkpoint(tiny_family, tmp_path, case):
    shutil.copy2(tiny_family["ft1"] / "model.safetensors", tmp_path / "orig.safetensors")
    d, index = make_sharded(tiny_family["ft1"], tmp_path / "sharded")
    mutate, needles = SHARD_CASES[case]
    mutate(d, index)
    merge_broken(tiny_family, d, tmp_path, *needles, exc=InputError)


def test_intact_sharded_checkpoint_merges_like_the_single_file(tiny_family, tmp_path):
    d, _ = make_sharded(tiny_family["ft1"], tmp_path / "sharded")
    a = plan_merge(linear_cfg(d, tiny_family["ft2"]), opts())
    b = plan_merge(linear_cfg(tiny_family["ft1"], tiny_family["ft2"]), opts())
    assert [(t.name, t.shape) for t in a.tensors] == [(t.name, t.shape) for t in b.tensors]


# -- model directories and config.json ---------------------------------------------------------------------------------
def _config(fn):
    def mutate(d: Path):
        conf = json.loads((d / "config.json").read_text())
        fn(conf)
        (d / "config.json").write_text(json.dumps(conf))
    return mutate


def _empty_dir(d: Path):
    shutil.rmtree(d)
    d.mkdir()


DIR_CASES = {
    "config_missing": (lambda d: (d / "config.json").unlink(), ["config.json", "missing"]),
    "config_not_json": (lambda d: (d / "config.json").write_text("{'model_type': llama"), ["config.json",
                                                                                           "not valid JSON"]),
    "config_not_utf8": (lambda d: (d / "config.json").write_bytes(b'{"model_type": "\xff"}'), ["config.json",
                                                                                              "UTF-8"]),
    "config_a_list": (lambda d: (d / "config.json").write_text("[1, 2]"), ["config.json", "JSON object"]),
    "config_without_model_type": (_config(lambda c: (c.pop("model_type"), c.pop("architectures"))),
                                  ["config.json", "model_type"]),
    "empty_directory": (_empty_dir, ["is empty"]),
    "pickle_only": (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
                    ["pytorch_model.bin", "--allow-pickle"]),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), ["no weights found"]),
    "dangling_symlink": (lambda d: ((d / "model.safetensors").unlink(),
                                    (d / "model.safetensors").symlink_to(d / "blobs" / "0123abcd")),
                         ["model.safetensors", "broken symbolic link", "blobs/0123abcd"]),
    "config_is_a_directory": (lambda d: ((d / "config.json").unlink(), (d / "config.json").mkdir()),
                              ["config.json", "cannot read"]),
}


@pytest.mark.parametrize("case", list(DIR_CASES))
def test_broken_model_directory(tiny_family, broken, tmp_path, case):
    mutate, needles = DIR_CASES[case]
    mutate(broken)
    merge_broken(tiny_family, broken, tmp_path, str(broken), *needles, exc=InputError)


def test_integer_tensor_where_others_are_float(tiny_family, broken, tmp_path):
    f = broken / "model.safetensors"
    sd = load_file(str(f))
    sd[Q1] = sd[Q1].float().round().to(torch.int16)
    save_file(sd, str(f), metadata={"format": "pt"})
    out = tmp_path / "out"
    expect_error(lambda: merge(linear_cfg(tiny_family["ft2"], broken), out, opts()), Q1, "I16", "BF16",
                 exc=InputError, out=out)


def test_legacy_pickle_format_loads_with_opt_in(tiny_family, broken, tmp_path):
    """Old (pre-zipfile, torch < 1.6) pytorch_model.bin files cannot be memory-mapped; with --allow-pickle they load
    (still weights_only) and merge like the safetensors original."""
    sd = load_file(str(broken / "model.safetensors"))
    (broken / "model.safetensors").unlink()
    torch.save(sd, broken / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    a = merge(linear_cfg(broken, tiny_family["ft2"]), tmp_path / "a", opts(allow_pickle=True))
    b = merge(linear_cfg(tiny_family["ft1"], tiny_family["ft2"]), tmp_path / "b", opts())
    sa, sb = load_file(str(tmp_path / "a" / a.shards[0])), load_file(str(tmp_path / "b" / b.shards[0]))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_model_reference_is_a_file(tiny_family, tmp_path):
    out = tmp_path / "out"
    f = tiny_family["ft1"] / "model.safetensors"
    expect_error(lambda: merge(linear_cfg(f, tiny_family["ft2"]), out, opts()), str(f), "got a file",
                 exc=InputError, out=out)


def test_gradient_needs_a_layer_count(tiny_family, broken, tmp_path):
    """Without num_hidden_layers a gradient cannot be sampled per layer; a scalar weight needs no layer count."""
    _config(lambda c: c.pop("num_hidden_layers"))(broken)
    cfg = linear_cfg(broken, tiny_family["ft2"])
    plan_merge(cfg, opts())  # scalars: fine
    cfg["models"][0]["parameters"]["weight"] = [0.2, 0.8]
    out = tmp_path / "out"
    expect_error(lambda: merge(cfg, out, opts()), "config.json", "num_hidden_layers", "gradient",
                 exc=InputError, out=out)


# -- YAML configs ------------------------------------------------------------------------------------------------------
def write_yaml(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "cfg.yml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def models_yaml(f, weight="0.5", extra="") -> str:
    return (f"merge_method: linear\nmodels:\n  - model: {f['ft1']}\n    parameters: {{weight: {weight}}}\n"
            f"  - model: {f['ft2']}\n    parameters: {{weight: 0.5}}\n{extra}")


def slices_yaml(f, r1="[0, 2]", r2="[0, 2]", base=None) -> str:
    return (f"merge_method: slerp\nbase_model: {base or f['base']}\nparameters: {{t: 0.5}}\nslices:\n"
            f"  - sources:\n      - model: {f['base']}\n        layer_range: {r1}\n"
            f"      - model: {f['ft1']}\n        layer_range: {r2}\n")


YAML_CASES = {
    "syntax_error": (lambda f: "merge_method: linear\nmodels: [\n  - model: x\n", ["line"]),
    "tab_indentation": (lambda f: "merge_method: linear\nmodels:\n\t- model: x\n", ["line"]),
    "empty_file": (lambda f: "", ["empty"]),
    "only_comments": (lambda f: "# nothing here\n", ["empty"]),
    "top_level_list": (lambda f: "- merge_method: linear\n", ["mapping", "list"]),
    "top_level_scalar": (lambda f: "linear\n", ["mapping", "str"]),
    "models_empty": (lambda f: "merge_method: linear\nmodels: []\n", ["'models' is empty"]),
    "models_not_list": (lambda f: "merge_method: linear\nmodels: abc\n", ["models"]),
    "model_entry_without_model": (lambda f: f"merge_method: linear\nmodels:\n  - parameters: {{weight: 1}}\n",
                                  ["models[0].model", "missing"]),
    "model_entry_is_a_string": (lambda f: f"merge_method: linear\nmodels:\n  - {f['ft1']}\n", ["models[0]"]),
    "weight_string": (lambda f: models_yaml(f, '"abc"'), ["models[0].parameters.weight", "abc"]),
    "weight_dict": (lambda f: models_yaml(f, "{a: 1}"), ["models[0].parameters.weight"]),
    "weight_nan": (lambda f: models_yaml(f, ".nan"), ["models[0].parameters.weight", "NaN"]),
    "weight_inf": (lambda f: models_yaml(f, ".inf"), ["models[0].parameters.weight", "finite"]),
    "weight_minus_inf_in_gradient": (lambda f: models_yaml(f, "[0.1, -.inf]"), ["models[0].parameters.weight",
                                                                                "finite"]),
    "filter_entry_without_value": (lambda f: models_yaml(f, "[{filter: self_attn}]"),
                                   ["models[0].parameters.weight[0].value", "missing"]),
    "filter_entry_misspelled": (lambda f: models_yaml(f, "[{filter: self_attn, vlaue: 1}]"),
                                ["unknown key 'vlaue'"]),
    "filter_entry_value_string": (lambda f: models_yaml(f, "[{filter: mlp, value: x}]"),
                                  ["models[0].parameters.weight[0].value", "got str 'x'"]),
    "weight_null": (lambda f: models_yaml(f, "null"), ["models[0].parameters.weight"]),
    "global_params_not_mapping": (lambda f: models_yaml(f, extra="parameters: [1, 2]\n"), ["parameters"]),
    "layer_range_past_end": (lambda f: slices_yaml(f, "[0, 5]", "[0, 5]"), ["layer_range", "[0, 5]", "2 layers"]),
    "layer_range_past_end_second_source": (lambda f: slices_yaml(f, "[0, 2]", "[1, 3]"),
                                           lambda f: ["layer_range", "[1, 3]", "2 layers", str(f["ft1"])]),
    "layer_range_reversed": (lambda f: slices_yaml(f, "[2, 0]", "[2, 0]"), ["layer_range", "[2, 0]"]),
    "layer_range_one_int": (lambda f: slices_yaml(f, "[0]", "[0]"), ["layer_range"]),
    "layer_range_three_ints": (lambda f: slices_yaml(f, "[0, 1, 2]", "[0, 1, 2]"), ["layer_range"]),
    "layer_range_not_ints": (lambda f: slices_yaml(f, "[a, 1]", "[0, 1]"), ["layer_range"]),
    "layer_range_float": (lambda f: slices_yaml(f, "[0, 1.5]", "[0, 1.5]"), ["layer_range"]),
    "slice_base_not_a_source": (lambda f: slices_yaml(f, base=f["ft2"]), ["base model", "sources"]),
    "duplicate_top_level_key": (lambda f: models_yaml(f) + "merge_method: ties\n", ["merge_method", "duplicate",
                                                                                   "line"]),
    "duplicate_nested_key": (lambda f: models_yaml(f, "0.5, weight: 0.7"), ["weight", "duplicate", "line 4"]),
    "adapter_dir_missing": (lambda f: models_yaml(f).replace(f"model: {f['ft1']}", f"model: {f['base']}+/nope/lora"),
                            ["/nope/lora", "does not exist"]),
    "adapter_dir_without_config": (lambda f: models_yaml(f).replace(f"model: {f['ft1']}",
                                                                    f"model: {f['base']}+{f['ft2']}"),
                                   lambda f: [str(f["ft2"]), "adapter_config.json"]),
    "hub_repo_not_cached": (lambda f: models_yaml(f).replace(f"model: {f['ft1']}", "model: no-such-org/no-such-model"),
                            ["no-such-org/no-such-model", "--download"]),
    "two_plus_signs": (lambda f: models_yaml(f).replace(f"model: {f['ft1']}", "model: a+b+c"), ["a+b+c", "'+'"]),
    "python_tag": (lambda f: 'merge_method: !!python/object/apply:os.system ["echo pwned"]\n',
                   ["line 1", "python/object/apply"]),
    "alias_bomb": (lambda f: "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)), ["alias"]),
    "deeply_nested": (lambda f: "merge_method: " + "[" * 5000 + "]" * 5000 + "\n", ["nested too deeply"]),
    "chat_template_not_a_template": (lambda f: models_yaml(f, extra="chat_template: chatmll\n"),
                                     ["chat_template", "chatmll"]),
    "chat_template_bad_jinja": (lambda f: models_yaml(f, extra="chat_template: '{% for m in messages %}{{ m }}'\n"),
                                ["chat_template", "Jinja", "does not parse"]),
    "not_utf8": (lambda f: models_yaml(f).encode() + b"# \xff\xfe\n", ["UTF-8"]),
    "empty_model_reference": (lambda f: models_yaml(f).replace(f"model: {f['ft1']}", 'model: ""'),
                              ["models[0].model", "empty"]),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_malformed_yaml(tiny_family, tmp_path, case):
    text, needles = YAML_CASES[case]
    needles = needles(tiny_family) if callable(needles) else needles
    p = write_yaml(tmp_path, text(tiny_family))
    out = tmp_path / "out"
    expect_error(lambda: merge(p, out, opts()), str(p) if case not in ("adapter_dir_missing",
                                                                        "adapter_dir_without_config",
                                                                        "two_plus_signs", "hub_repo_not_cached")
                 else "", *needles, out=out)


def test_yaml_anchors_and_merge_keys_are_not_duplicates(tiny_family, tmp_path):
    """YAML's own reuse syntax (anchors, ``<<:`` merge keys) is not a duplicate key."""
    f = tiny_family
    p = write_yaml(tmp_path, f"merge_method: linear\nmodels:\n  - model: {f['ft1']}\n    parameters: &p {{weight: 0.5}}\n"
                             f"  - model: {f['ft2']}\n    parameters:\n      <<: *p\n")
    assert len(plan_merge(p, opts()).tensors) == 21


# -- LoRA adapters -----------------------------------------------------------------------------------------------------
@pytest.fixture()
def adapter(tiny_family, tmp_path) -> Path:
    dst = tmp_path / "lora"
    shutil.copytree(tiny_family["lora"], dst)
    return dst


def _adapter_config(fn):
    def mutate(d: Path):
        p = d / "adapter_config.json"
        conf = json.loads(p.read_text())
        fn(conf)
        p.write_text(json.dumps(conf))
    return mutate


def _adapter_tensors(fn):
    def mutate(d: Path):
        f = d / "adapter_model.safetensors"
        sd = load_file(str(f))
        fn(sd)
        save_file(sd, str(f))
    return mutate


LA = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
LB = LA.replace("lora_A", "lora_B")


def _rename_module(sd):
    for k in (LA, LB):
        sd[k.replace("q_proj", "qq_proj")] = sd.pop(k)


def _nan(sd):
    sd[LB] = sd[LB].clone()
    sd[LB][3, 1] = float("nan")


def _inf(sd):
    sd[LA] = sd[LA].clone()
    sd[LA][0, 0] = float("inf")


LORA_CASES = {
    "config_missing": (lambda d: (d / "adapter_config.json").unlink(), ["adapter_config.json", "missing"]),
    "config_not_json": (lambda d: (d / "adapter_config.json").write_text("{r: 4"), ["adapter_config.json"]),
    "config_a_list": (lambda d: (d / "adapter_config.json").write_text("[]"), ["adapter_config.json",
                                                                              "JSON object"]),
    "r_not_a_number": (_adapter_config(lambda c: c.__setitem__("r", "four")), ["adapter_config.json", "'r'"]),
    "r_disagrees_with_tensors": (_adapter_config(lambda c: c.__setitem__("r", 16)), ["lora_A.weight", "rank 4",
                                                                                    "r = 16"]),
    "r_missing_peft_default_8": (_adapter_config(lambda c: c.pop("r")), ["rank 4", "r = 8", "PEFT's default"]),
    "rank_pattern_value_not_a_number": (_adapter_config(lambda c: c.__setitem__("rank_pattern", {"q_proj": "4"})),
                                        ["adapter_config.json", "rank_pattern['q_proj']"]),
    "rank_pattern_disagrees": (_adapter_config(lambda c: c.__setitem__("rank_pattern", {"q_proj": 2})),
                               ["q_proj.lora_A.weight", "rank 4", "r = 2", "rank_pattern"]),
    "rank_mismatch_a_b": (_adapter_tensors(lambda sd: sd.__setitem__(LB, torch.zeros(32, 3))),
                          ["rank mismatch", LA, LB]),
    "lora_a_without_b": (_adapter_tensors(lambda sd: sd.pop(LB)), ["model.layers.0.self_attn.q_proj", "no lora_B"]),
    "targets_missing_module": (_adapter_tensors(_rename_module), ["qq_proj", "does not have"]),
    "shape_mismatch": (_adapter_tensors(lambda sd: sd.__setitem__(LA, torch.zeros(4, 40))),
                       ["model.layers.0.self_attn.q_proj.weight", "shape"]),
    "nan_values": (_adapter_tensors(_nan), [LB, "NaN"]),
    "inf_values": (_adapter_tensors(_inf), [LA, "inf"]),
    "pickle_only": (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"),
                    ["adapter_model.bin", "--allow-pickle"]),
    "weights_not_safetensors": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"PK\x03\x04 zip"),
                                ["adapter_model.safetensors"]),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_broken_adapter(tiny_family, adapter, tmp_path, case):
    mutate, needles = LORA_CASES[case]
    mutate(adapter)
    out = tmp_path / "out"
    expect_error(lambda: merge_lora(tiny_family["base"], adapter, out, opts()), *needles, exc=InputError, out=out)
    # the same adapter as a `base+adapter` reference fails the same way
    ref = f"{tiny_family['base']}+{adapter}"
    expect_error(lambda: merge(linear_cfg(ref, tiny_family["ft2"]), out, opts()), *needles, exc=InputError, out=out)


def test_missing_lora_alpha_means_peft_default_8(tiny_family, adapter, tmp_path):
    """PEFT's LoraConfig defaults lora_alpha to 8: an adapter config without it merges exactly like lora_alpha: 8."""
    _adapter_config(lambda c: c.__setitem__("lora_alpha", 8))(adapter)
    ref = merge_lora(tiny_family["base"], adapter, tmp_path / "explicit", opts())
    _adapter_config(lambda c: c.pop("lora_alpha"))(adapter)
    res = merge_lora(tiny_family["base"], adapter, tmp_path / "default", opts())
    a = load_file(str(tmp_path / "explicit" / ref.shards[0]))
    b = load_file(str(tmp_path / "default" / res.shards[0]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(str(tiny_family["base"] / "model.safetensors"))
    assert not torch.equal(a[Q0], base[Q0])  # the adapter did change the weight


# -- NaN/inf in model weights: opt-in check (--check-finite) --------------------------------------------------------
@pytest.mark.parametrize("method", ["linear", "passthrough"])  # computed, and byte-copied tensors
def test_check_finite_names_the_tensors_and_writes_nothing(tiny_family, broken, tmp_path, method):
    f = broken / "model.safetensors"
    sd = load_file(str(f))
    sd[Q1] = sd[Q1].clone()
    sd[Q1][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save_file(sd, str(f), metadata={"format": "pt"})
    cfg = linear_cfg(broken, tiny_family["ft2"]) if method == "linear" else \
        {"merge_method": "passthrough", "models": [{"model": str(broken)}]}
    out = tmp_path / "out"
    expect_error(lambda: merge(cfg, out, opts(check_finite=True)), Q1, "(3)", "NaN/inf", exc=InputError, out=out)
    # without the check the merge goes through (the check is opt-in; the manifest says whether it ran)
    res = merge(cfg, out, opts())
    assert "checked_finite" not in res.manifest
    assert torch.isnan(load_file(str(out / res.shards[0]))[Q1].float()).any()


def test_check_finite_passes_clean_merges(tiny_family, tmp_path):
    res = merge(linear_cfg(tiny_family["ft1"], tiny_family["ft2"]), tmp_path / "out", opts(check_finite=True))
    assert res.manifest["checked_finite"] is True


@pytest.mark.parametrize("code,np_dtype", [("F32", "float32"), ("F16", "float16"), ("F64", "float64")])
def test_count_nonfinite_matches_numpy(code, np_dtype):
    import numpy as np

    from merge_ops.safetensors_io import count_nonfinite

    rng = np.random.default_rng(0)
    x = rng.standard_normal(4096).astype(np_dtype)
    x[rng.integers(0, 4096, 50)] = np.nan
    x[rng.integers(0, 4096, 50)] = np.inf
    x[7] = -np.inf
    x[8] = np.finfo(np_dtype).max  # largest finite: not counted
    assert count_nonfinite(code, x.tobytes()) == int((~np.isfinite(x)).sum())
    bf = torch.from_numpy(x.astype("float32")).to(torch.bfloat16)
    assert count_nonfinite("BF16", bf.view(torch.int16).numpy().tobytes()) == int((~torch.isfinite(bf)).sum())


# -- options and the output side ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,needles", [
    ({"shard_size": "5XB"}, ["5XB"]),
    ({"shard_size": "0"}, ["'0'", "positive"]),
    ({"shard_size": "-1"}, ["'-1'"]),
    ({"shard_size": 0}, ["shard size", "positive"]),
    ({"shard_size": "nan GB"}, ["nan GB"]),
    ({"device": "gpu"}, ["'gpu'", "cuda:N"]),
    ({"device": "cuda:abc"}, ["'cuda:abc'", "cuda:N"]),
    ({"device": "cuda:-1"}, ["'cuda:-1'", "cuda:N"]),
])
def test_bad_options(tiny_family, tmp_path, kw, needles):
    out = tmp_path / "out"
    cfg = linear_cfg(tiny_family["ft1"], tiny_family["ft2"])
    expect_error(lambda: merge(cfg, out, opts(**kw)), *needles, exc=ConfigError, out=out)


def test_output_is_an_existing_file(tiny_family, tmp_path):
    out = tmp_path / "out"
    out.write_text("keep me")
    with pytest.raises(InputError, match="exists and is not a directory"):
        merge(linear_cfg(tiny_family["ft1"], tiny_family["ft2"]), out, opts())
    assert out.read_text() == "keep me" and list(tmp_path.iterdir()) == [out]


def test_output_parent_is_a_file(tiny_family, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    expect_error(lambda: merge(linear_cfg(tiny_family["ft1"], tiny_family["ft2"]), out, opts()),
                 str(tmp_path / "file"), "not a directory", exc=InputError)
    assert (tmp_path / "file").read_text() == "x" and len(list(tmp_path.iterdir())) == 1


def test_output_parent_is_created_like_mergekit(tiny_family, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    merge(linear_cfg(tiny_family["ft1"], tiny_family["ft2"]), out, opts())
    assert (out / "mergeline.json").is_file() and sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_failed_merge_leaves_existing_output_intact(tiny_family, tmp_path):
    out = tmp_path / "out"
    merge(linear_cfg(tiny_family["ft1"], tiny_family["ft2"]), out, opts())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = linear_cfg(tiny_family["ft1"], tmp_path / "nope")
    with pytest.raises(InputError, match="nope"):
        merge(bad, out, opts())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(out) == [out]
    # a new complete merge replaces it as a whole (existing behaviour, kept)
    merge(linear_cfg(tiny_family["ft2"], tiny_family["ft1"], dtype="float32"), out, opts())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32" and leftovers(out) == [out]


def test_output_that_is_not_a_model_directory_is_not_replaced(tiny_family, tmp_path):
    out = tmp_path / "docs"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    expect_error(lambda: merge(linear_cfg(tiny_family["ft1"], tiny_family["ft2"]), out, opts()),
                 str(out), "not a model directory", exc=InputError)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and list(tmp_path.iterdir()) == [out]


def test_out_quant_errors_leave_nothing(tiny_family, tmp_path):
    """With out_quant the merge goes through a hidden float directory first; errors remove it too."""
    out = tmp_path / "out"
    expect_error(lambda: merge(linear_cfg(tiny_family["ft1"], tmp_path / "nope"), out, opts(out_quant="nf4")),
                 "nope", exc=InputError, out=out)
    a = shutil.copytree(tiny_family["ft1"], tmp_path / "a")
    expect_error(lambda: merge(linear_cfg(a, tiny_family["ft2"]), a, opts(out_quant="nf4")), str(a), "input",
                 exc=InputError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"] and (a / "model.safetensors").is_file()


@pytest.mark.parametrize("base,adapter,needles", [
    ("file", "lora", ["model.safetensors", "got a file"]),
    ("base", "file", ["adapter_model.safetensors", "got a file"]),
    ("base", "model", ["adapter_config.json", "missing"]),
    ("missing", "lora", ["nope", "does not exist"]),
    ("base", "missing", ["nope", "does not exist"]),
])
def test_merge_lora_wrong_paths(tiny_family, tmp_path, base, adapter, needles):
    paths = {"file": tiny_family["base"] / "model.safetensors", "base": tiny_family["base"],
             "lora": tiny_family["lora"], "model": tiny_family["ft1"], "missing": tmp_path / "nope"}
    if adapter == "file":
        paths["file"] = tiny_family["lora"] / "adapter_model.safetensors"
    out = tmp_path / "out"
    expect_error(lambda: merge_lora(paths[base], paths[adapter], out, opts()), *needles, exc=InputError, out=out)


def test_config_path_problems(tiny_family, tmp_path):
    out = tmp_path / "out"
    expect_error(lambda: merge(tmp_path, out, opts()), str(tmp_path), "not a file", exc=ConfigError, out=out)
    expect_error(lambda: merge(tmp_path / "missing.yml", out, opts()), "missing.yml", "does not exist",
                 exc=ConfigError, out=out)
    cfg = linear_cfg(tiny_family["ft1"], tiny_family["ft2"], tokenizer_source=str(tmp_path / "no-tok"))
    expect_error(lambda: merge(cfg, out, opts()), "tokenizer_source", "no-tok", "does not exist", exc=InputError,
                 out=out)
    (tmp_path / "no-tok").mkdir()
    expect_error(lambda: merge(cfg, out, opts()), "tokenizer_source", "no-tok", "no tokenizer files",
                 exc=InputError, out=out)


@pytest.mark.parametrize("where", ["input", "parent_of_input", "adapter"])
def test_output_over_an_input_is_refused(tiny_family, tmp_path, where):
    models = tmp_path / "models"
    models.mkdir()
    a = shutil.copytree(tiny_family["ft1"], models / "a")
    lora = shutil.copytree(tiny_family["lora"], tmp_path / "lora")
    cfg = linear_cfg(a, f"{tiny_family['base']}+{lora}")
    out = {"input": a, "parent_of_input": models, "adapter": lora}[where]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    expect_error(lambda: merge(cfg, out, opts()), str(out), "input", exc=InputError)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# -- the CLI: one message, the right status, no traceback, nothing left ------------------------------------------------
def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    tmpdir = tmp_path / "cli-tmp"
    tmpdir.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmpdir), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MERGELINE_TRACEBACK", None)
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert TRACEBACK not in r.stderr, r.stderr
    assert list(tmpdir.iterdir()) == [], list(tmpdir.iterdir())
    return r


def expect_cli_error(tmp_path: Path, args: list[str], *needles: str, out: Path | None = None) -> str:
    r = run_cli(tmp_path, *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and lines[0].startswith(("mergeline: error:", "usage: mergeline")), r.stderr
    for n in needles:
        assert n in r.stderr, f"{n!r} not in {r.stderr}"
    if out is not None:
        assert leftovers(out) == []
    return r.stderr


def test_cli_corrupt_header_and_duplicate_key(tiny_family, broken, tmp_path):
    f = broken / "model.safetensors"
    _raw_header(b"{nope")(f)
    p = write_yaml(tmp_path, models_yaml(tiny_family).replace(str(tiny_family["ft1"]), str(broken)))
    out = tmp_path / "out"
    expect_cli_error(tmp_path, ["merge", str(p), str(out)], str(f), "not valid JSON", out=out)
    p.write_text(models_yaml(tiny_family) + "dtype: float16\ndtype: bfloat16\n")
    expect_cli_error(tmp_path, ["merge", str(p), str(out)], str(p), "duplicate key 'dtype'", "line", out=out)


def test_cli_pickle_only_says_how_to_opt_in(tiny_family, broken, tmp_path):
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    p = write_yaml(tmp_path, models_yaml(tiny_family).replace(str(tiny_family["ft1"]), str(broken)))
    out = tmp_path / "out"
    expect_cli_error(tmp_path, ["merge", str(p), str(out)], "pytorch_model.bin", "--allow-pickle", out=out)
    # opted in, a pickle that is not a state dict fails cleanly too, and its conversion dir under TMPDIR is removed
    torch.save([1, 2], broken / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    expect_cli_error(tmp_path, ["merge", str(p), str(out), "--allow-pickle"], "pytorch_model.bin",
                     "state dict", out=out)


def test_cli_output_is_a_file(tiny_family, tmp_path):
    p = write_yaml(tmp_path, models_yaml(tiny_family))
    out = tmp_path / "out"
    out.write_text("keep me")
    expect_cli_error(tmp_path, ["merge", str(p), str(out)], str(out), "not a directory")
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("flags,needles", [
    (["--shard-size", "5XB"], ["5XB"]),
    (["--device", "cuda:abc"], ["cuda:abc"]),
    (["--seed", "abc"], ["--seed", "invalid int value: 'abc'"]),
])
def test_cli_bad_flags(tiny_family, tmp_path, flags, needles):
    p = write_yaml(tmp_path, models_yaml(tiny_family))
    out = tmp_path / "out"
    expect_cli_error(tmp_path, ["merge", str(p), str(out), *flags], *needles, out=out)


def test_cli_merge_lora_broken_adapter(tiny_family, adapter, tmp_path):
    (adapter / "adapter_config.json").unlink()
    out = tmp_path / "out"
    expect_cli_error(tmp_path, ["merge-lora", str(tiny_family["base"]), str(adapter), str(out)],
                     "adapter_config.json", out=out)


def test_console_script_entry_point(tiny_family, tmp_path):
    """The installed ``mergeline`` script (pyproject [project.scripts]) behaves like ``python -m pipelines.cli``."""
    script = Path(sys.executable).parent / "mergeline"
    if not script.exists():
        pytest.skip("the mergeline console script is not installed in this environment")
    p = write_yaml(tmp_path, models_yaml(tiny_family, "[0.5, .nan]"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's code, whichever checkout installed the script
    r = subprocess.run([str(script), "merge", str(p), str(tmp_path / "out")], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and TRACEBACK not in r.stderr, r.stderr
    assert r.stderr.startswith("mergeline: error:") and "models[0].parameters.weight" in r.stderr and "NaN" in r.stderr
    assert leftovers(tmp_path / "out") == []


def test_cli_unexpected_error_is_one_line_and_status_1(tmp_path):
    """A bug (not bad input) still prints one line, not a traceback, and says how to get the traceback."""
    r = run_cli(tmp_path, "merge", "/dev/null/x.yml", str(tmp_path / "out"), "--shard-size", "1GB")
    assert r.returncode == 2 and "does not exist" in r.stderr  # /dev/null/x.yml: bad input, not a bug
    code = ("import sys, pipelines.cli as c\n"
            "def boom(args): raise RuntimeError('kaboom')\n"
            "c.cmd_methods = boom\n"
            "sys.exit(c.main(['methods']))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "MERGELINE_TRACEBACK"})
    assert r.returncode == 1 and TRACEBACK not in r.stderr, r.stderr
    assert "kaboom" in r.stderr and "MERGELINE_TRACEBACK=1" in r.stderr
    # an option model refusing a value is bad input (status 2), not a bug
    code = code.replace("raise RuntimeError('kaboom')", "from merge_ops.api import MergeOptions; MergeOptions(seed='x')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "MERGELINE_TRACEBACK"})
    assert r.returncode == 2 and TRACEBACK not in r.stderr, r.stderr
    assert r.stderr.startswith("mergeline: error: invalid option: seed:"), r.stderr


def test_exporters_refuse_bad_outputs(tiny_family, tmp_path):
    """The GGUF and bnb exporters share the checks: a parent that is a file, an output over the input, bad flags."""
    from merge_ops.gguf_export import export_gguf

    (tmp_path / "file").write_text("x")
    expect_error(lambda: export_gguf(tiny_family["base"], tmp_path / "file" / "m.gguf"), str(tmp_path / "file"),
                 "not a directory")
    m = shutil.copytree(tiny_family["base"], tmp_path / "m")
    before = (m / "model.safetensors").read_bytes()
    expect_error(lambda: export_gguf(m, m / "model.safetensors"), "model's own files")
    assert (m / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "m"]
    r = run_cli(tmp_path, "export-bnb", str(m), str(tmp_path / "q"), "--blocksize", "7")
    assert r.returncode == 2 and "--blocksize: invalid choice: 7" in r.stderr
