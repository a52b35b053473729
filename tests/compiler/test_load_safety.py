"""``sparse_compile.load`` never runs code a file names, and reports every bad file as ValueError."""
import json

import pytest
import torch
import torch.fx as fx
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparse_compile.compiler.serialize import META_KEY, load, save, tensor_checksum


def _write(path, spec, tensors):
    spec["tensor_sha256"] = tensor_checksum(tensors)  # an attacker recomputes it
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(spec)})
    return path


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[META_KEY]), {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def saved_gm(tmp_path_factory):
    """A traced two-layer model saved with its example input shape."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval())
    path = tmp_path_factory.mktemp("gm") / "m.sc"
    save(gm, path, example_inputs=(torch.randn(2, 8),))
    return path


def _node(name, target, args, op="call_function", kwargs=None):
    return {"op": op, "name": name, "target": target, "args": {"__tuple__": args},
            "kwargs": {"__dict__": kwargs or {}}}


def _with_node(saved, tmp_path, node, pos=1):
    spec, tensors = _read(saved)
    spec["graph"].insert(pos, node)
    return _write(tmp_path / "bad.sc", spec, tensors)


@pytest.mark.parametrize("check", [True, False])
def test_collect_env_exploit_does_not_run(saved_gm, tmp_path, check):
    """The reported exploit: a node calling torch.utils.collect_env.run with a shell command."""
    canary = tmp_path / "pwned"
    bad = _with_node(saved_gm, tmp_path, _node("boom", "torch.utils.collect_env:run", [f"id > {canary}"]))
    with pytest.raises(ValueError, match="node 'boom' calls 'torch.utils.collect_env:run', which is not an allowed"):
        load(bad, check=check)
    assert not canary.exists()


FORBIDDEN = {
    "builtins_eval": "builtins:eval",
    "builtins_exec": "builtins:exec",
    "builtins_import": "builtins:__import__",
    "builtins_open": "builtins:open",
    "operator_attrgetter": "_operator:attrgetter",
    "operator_methodcaller": "operator:methodcaller",
    "importlib": "importlib:import_module",
    "subprocess_run": "subprocess:run",
    "subprocess_check_output": "subprocess:check_output",
    "os_system": "os:system",
    "posix_system": "posix:system",
    "torch_hub": "torch.hub:load",
    "torch_utils_cpp_extension": "torch.utils.cpp_extension:load_inline",
    "torch_utils_collect_env": "torch.utils.collect_env:run_and_read_all",
    "torch_load": "torch:load",
    "torch_serialization_load": "torch.serialization:load",
    "torch_from_file": "torch:from_file",
    "torch_ops_aten": "torch.ops:aten.from_file.default",
    "torch_ops_private_cpu": "torch.ops:sparse_compile._condensed_linear_cpu.default",
    "torch_ops_other_ns": "torch.ops:prims.device_put.default",
    "torchvision_io": "torchvision.io:read_file",
    "timm_helper": "timm.models:load_checkpoint",
}


@pytest.mark.parametrize("ref", list(FORBIDDEN.values()), ids=list(FORBIDDEN))
def test_forbidden_function_families(saved_gm, tmp_path, ref):
    canary = tmp_path / "pwned"
    bad = _with_node(saved_gm, tmp_path, _node("evil", ref, [f"touch {canary}"]))
    with pytest.raises(ValueError, match=r"node 'evil' (calls|has)"):
        load(bad)
    assert not canary.exists()


@pytest.mark.parametrize("attr", ["__class__", "__globals__", "__builtins__", "load_state_dict", "register_hook"])
def test_getattr_chains_refused(saved_gm, tmp_path, attr):
    """getattr only reads a constant from a short list (shape, dtype, ...): no walk to globals."""
    bad = _with_node(saved_gm, tmp_path, _node("g", "builtins:getattr", [{"__node__": "input_1"}, attr]))
    with pytest.raises(ValueError, match="node 'g': getattr is allowed only with a constant attribute"):
        load(bad)


@pytest.mark.parametrize("method", ["register_hook", "apply_", "map_", "__reduce_ex__", "storage", "data_ptr",
                                    "set_", "backward", "numpy"])
def test_forbidden_tensor_methods(saved_gm, tmp_path, method):
    bad = _with_node(saved_gm, tmp_path, _node("m", method, [{"__node__": "input_1"}], op="call_method"))
    with pytest.raises(ValueError, match=f"node 'm' calls method '{method}', which is not an allowed"):
        load(bad)


def test_generated_source_injection_refused(saved_gm, tmp_path):
    """fx writes placeholder names, keyword names and attribute paths into the forward it execs."""
    canary = tmp_path / "pwned"
    spec, tensors = _read(saved_gm)
    spec["graph"][0]["target"] = f"x=__import__('os').system('touch {canary}')"
    with pytest.raises(ValueError, match="bad placeholder name"):
        load(_write(tmp_path / "p.sc", spec, tensors))

    spec, tensors = _read(saved_gm)
    relu = next(n for n in spec["graph"] if n["op"] == "call_module" and n["target"] == "1")
    relu["kwargs"] = {"__dict__": {f"a=__import__('os').system('touch {canary}')": 1}}
    with pytest.raises(ValueError, match="bad keyword arguments"):
        load(_write(tmp_path / "k.sc", spec, tensors))

    spec, tensors = _read(saved_gm)
    spec["graph"].insert(1, {"op": "get_attr", "name": "w", "target": '0").__class__.__init__.__globals__["os"]',
                             "args": {"__tuple__": []}, "kwargs": {"__dict__": {}}})
    with pytest.raises(ValueError, match="bad get_attr target"):
        load(_write(tmp_path / "a.sc", spec, tensors))
    assert not canary.exists()


@pytest.mark.parametrize("cls", ["subprocess.Popen", "torch.fx.graph_module.GraphModule",
                                 "torch.jit._script.RecursiveScriptModule", "torch.nn.parallel.distributed.DistributedDataParallel",
                                 "builtins.object", "os._wrap_close"])
def test_forbidden_module_classes(saved_gm, tmp_path, cls):
    spec, tensors = _read(saved_gm)
    spec["root"]["children"]["0"]["class"] = cls
    with pytest.raises(ValueError, match="class .* (is not allowed|not an allowed)"):
        load(_write(tmp_path / "c.sc", spec, tensors))


def test_attribute_shadowing_a_method_refused(saved_gm, tmp_path):
    spec, tensors = _read(saved_gm)
    spec["root"]["children"]["0"]["attrs"]["forward"] = "print"
    with pytest.raises(ValueError, match="attribute 'forward' of '0' is not allowed"):
        load(_write(tmp_path / "f.sc", spec, tensors))


def test_malformed_specs_are_value_errors(saved_gm, tmp_path):
    """Deep JSON, wrong types in every slot: always ValueError with the reason, never anything else."""
    spec, tensors = _read(saved_gm)
    raw = '{"format": "sparse_compile.model", "version": 1, "root": ' + "[" * 200000 + "]" * 200000 + "}"
    save_file(tensors, str(tmp_path / "deep.sc"), metadata={META_KEY: raw})
    with pytest.raises(ValueError, match="sparse_compile.load"):
        load(tmp_path / "deep.sc")

    edits = [
        lambda s: s.__setitem__("root", 5),
        lambda s: s["root"].__setitem__("children", [1, 2]),
        lambda s: s["root"]["children"]["0"]["params"].__setitem__("weight", 3),
        lambda s: s["graph"].__setitem__(1, {"op": "call_module", "name": "x1", "target": "nope"}),
        lambda s: s["graph"].__setitem__(1, "node"),
        lambda s: s.__setitem__("graph", {"a": 1}),
        lambda s: s["graph"][1].__setitem__("args", {"__tuple__": [{"__node__": "missing"}]}),
        lambda s: s["graph"][1].__setitem__("args", {"__device__": "bogus:7"}),
        lambda s: s.__setitem__("report", {"layers": "x"}),
        lambda s: s.__setitem__("inputs", [{"shape": ["a"], "dtype": "float32"}]),
        lambda s: s.__setitem__("inputs", [{"shape": [2, 8], "dtype": "load"}]),
        lambda s: s.__setitem__("inputs", [{"shape": [2, 9], "dtype": "float32"}]),
        lambda s: s.__setitem__("class_name", "A(B)"),
    ]
    for i, edit in enumerate(edits):
        spec, tensors = _read(saved_gm)
        edit(spec)
        with pytest.raises(ValueError, match="sparse_compile.load"):
            load(_write(tmp_path / f"e{i}.sc", spec, tensors))


def test_checksum_detects_flipped_tensor_byte(saved_gm, tmp_path):
    """Without recomputing the checksum, any changed tensor byte is reported."""
    spec, tensors = _read(saved_gm)
    k = sorted(tensors)[0]
    tensors[k] = tensors[k].clone()
    tensors[k].view(-1)[0] += 1.0
    save_file(tensors, str(tmp_path / "flip.sc"), metadata={META_KEY: json.dumps(spec)})
    with pytest.raises(ValueError, match="do not match the file's checksum"):
        load(tmp_path / "flip.sc")
    assert isinstance(load(saved_gm), nn.Module)


# --- direct calls of the condensed op in a graph ------------------------------------------------
class _OpModel(nn.Module):
    def __init__(self, fan_in=16, n=4, k=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.values = nn.Parameter(torch.randn(n, k, generator=g), requires_grad=False)
        self.register_buffer("indices", torch.stack([torch.randperm(fan_in, generator=g)[:k] for _ in range(n)])
                             .to(torch.int32))

    def forward(self, x):
        return torch.ops.sparse_compile.condensed_linear(x, self.values, self.indices, None)


@pytest.fixture(scope="module")
def saved_op(tmp_path_factory):
    import sparse_compile  # noqa: F401  (registers the op)

    gm = fx.symbolic_trace(_OpModel())
    path = tmp_path_factory.mktemp("op") / "op.sc"
    save(gm, path, example_inputs=(torch.randn(1, 16),))
    back = load(path)
    x = torch.randn(2, 16)
    torch.testing.assert_close(back(x), gm(x))
    return path


@pytest.mark.parametrize("bad,check,match", [
    (-1, True, "negative index -1"),
    (-1, False, "negative index -1"),
    (16, True, "index 16 is out of range for a fan-in of 16"),
    (2 ** 30, True, "index 1073741824 is out of range"),
])
def test_direct_op_nodes_validated(saved_op, tmp_path, bad, check, match):
    spec, tensors = _read(saved_op)
    tensors["indices"] = tensors["indices"].clone()
    tensors["indices"][0, 0] = bad
    with pytest.raises(ValueError, match=match):
        load(_write(tmp_path / "bad.sc", spec, tensors), check=check)


def test_op_out_of_range_without_check_fails_at_call_not_in_kernel(saved_op, tmp_path):
    """check=False skips the shape run; the op's own per-call check still refuses the input."""
    spec, tensors = _read(saved_op)
    tensors["indices"] = tensors["indices"].clone()
    tensors["indices"][0, 0] = 16
    m = load(_write(tmp_path / "bad.sc", spec, tensors), check=False)
    with pytest.raises(ValueError, match="index 16 is out of range for a fan-in of 16"):
        m(torch.randn(1, 16))


def test_op_node_weights_must_be_file_tensors(saved_op, tmp_path):
    spec, tensors = _read(saved_op)
    node = next(n for n in spec["graph"] if n["op"] == "call_function")
    node["args"]["__tuple__"][2] = {"__node__": "x"}  # indices computed from the input
    with pytest.raises(ValueError, match="indices must be a tensor stored in the file"):
        load(_write(tmp_path / "bad.sc", spec, tensors))
