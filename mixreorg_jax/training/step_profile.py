"""Where a train step's time goes, summed by kind, ours (a `jax.profiler` trace) and PyTorch's
(`torch.profiler`): what `python -m mixreorg_jax.benchmark --against=pytorch --profile` reports.

Ours: the trace has one event per thunk XLA:CPU ran (a fusion, a dot, a copy), named as the
compiled HLO names its instruction; each instruction's kind comes from its `op_name` metadata
(the JAX source op and the module path it ran in) and the opcodes inside it. PyTorch: each aten
op's own (self) time, its kind from the op's name, ops run inside the optimiser's step or the
gradient clipping counted as the optimiser. Times are wall milliseconds per step: ours with each
instant split between the thunks XLA ran at once (`sum_by_kind`), PyTorch's ops run one at a
time; each side's kinds add up to a little less than its step (the gaps between ops).

The kinds, on both sides (`KINDS`):
  matmul               dense layers, attention's two products, the patch embedding; on our side
                       every fusion holding a dot, so a softmax reduction XLA fused into the
                       dot's loop counts here
  softmax and masking  attention and assignment softmax, forward and backward, the causal mask
  gelu                 the activation, forward and backward
  layernorm            LayerNorm, forward and backward
  grouping             Gumbel noise and the hard (straight-through one-hot) assignment
  optimiser            AdamW, gradient clipping, the schedule
  layout copies        copies, transposes and reshapes that only move data
  other                the rest: residual adds, biases, losses, the data's casts
"""

import bisect
import collections
import glob
import gzip
import json
import re
import tempfile

KINDS = (
    "matmul",
    "softmax and masking",
    "gelu",
    "layernorm",
    "grouping",
    "optimiser",
    "layout copies",
    "other",
)
_MOVES = {
    "fusion",
    "copy",
    "transpose",
    "bitcast",
    "reshape",
    "broadcast",
    "parameter",
    "slice",
    "tuple",
}
_MOVES |= {"concatenate", "pad", "dynamic-slice", "dynamic-update-slice", "get-tuple-element"}
_GELU_OPS = {"mul", "add", "add_any", "sub", "neg", "exp", "logistic", "div"}
_SOFTMAX_OPS = {"reduce_max", "reduce_sum", "sub", "exp", "div", "mul", "select_n", "add_any"}
_SOFTMAX_OPS |= {"neg", "stop_gradient", "broadcast_in_dim", "max"}
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = .*?\s([a-z][\w\-]*)\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, set[str]]]:
    """{instruction: (op_name, opcodes)} of a compiled module's text (`compiled.as_text()`):
    every instruction of every computation, with the opcodes of the computations it calls
    (a fusion's body), to a depth of 4."""
    computations, current = {}, None
    for line in hlo_text.splitlines():
        if not line.startswith(" ") and (header := _HEADER.match(line)):
            current = computations.setdefault(header.group(1), [])
        elif current is not None and line.startswith("  "):
            current.append(line)

    def opcodes(line: str, depth: int = 0) -> set[str]:
        instruction = _INSTRUCTION.match(line)
        found = {instruction.group(2)} if instruction else set()
        if depth < 4:
            for called in _CALLS.findall(line):
                for inner in computations.get(called, ()):
                    found |= opcodes(inner, depth + 1)
        return found

    instructions = {}
    for lines in computations.values():
        for line in lines:
            if instruction := _INSTRUCTION.match(line):
                op_name = _OP_NAME.search(line)
                instructions[instruction.group(1)] = (
                    op_name.group(1) if op_name else "",
                    opcodes(line),
                )
    return instructions


def our_kind(op_name: str, opcodes: set[str]) -> str:
    """The kind (`KINDS`) of one compiled instruction of our step."""
    if "jvp(" not in op_name:  # Outside the differentiated loss: the update.
        return "optimiser" if op_name else "other"
    if opcodes & {"dot", "convolution"}:
        return "matmul"
    if "/assign/" in op_name and re.search(r"gumbel|threefry|argmax|one_hot|\beq\b", op_name):
        return "grouping"
    parent, _, last = op_name.rpartition("/")
    parent = parent.rpartition("/")[2]
    if "erf" in opcodes or last in ("erf", "erfc") or (parent == "mlp" and last in _GELU_OPS):
        return "gelu"  # The erf GELU's fusions and the backward's products and sums.
    if re.search(r"(^|_)norm(\d|_|$)", parent):
        return "layernorm"
    if opcodes <= _MOVES or (last in ("reshape", "transpose") and opcodes <= _MOVES | {"add"}):
        return "layout copies"  # (A bias add XLA fused into a transpose between head layouts.)
    if parent in ("attn", "assign") and last in _SOFTMAX_OPS:
        return "softmax and masking"
    return "other"


def our_profile(run, steps: int, hlo_text: str) -> dict[str, float]:
    """Milliseconds per step by kind of `steps` calls of `run` (one step, blocking), traced with
    `jax.profiler`; `hlo_text` is the step's compiled module (`compiled.as_text()`)."""
    import jax

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    return sum_by_kind(events, hlo_instructions(hlo_text), steps)


def thunk_intervals(events: list[dict]) -> list[tuple[str, float, float]]:
    """(instruction, start, end) in microseconds of each thunk a trace holds.

    A thunk's event spans its launch; one that runs asynchronously on the thread pool (an Eigen
    dot, a parallel loop fusion) finishes at its `end: <name>` event, which the executor records
    on whichever thread completes it. Without that, the weight-gradient dots read as about 0.4 ms
    each and the time they run as time no thunk ran.
    """
    ends = collections.defaultdict(list)
    for event in events:
        if event.get("ph") == "X" and event.get("name", "").startswith("end: "):
            ends[event["name"][len("end: ") :]].append(event["ts"])
    for times in ends.values():
        times.sort()
    intervals = []
    for event in events:
        name = event.get("args", {}).get("hlo_op")
        if event.get("ph") == "X" and name:
            end, times = event["ts"] + event["dur"], ends.get(event["name"], [])
            if (i := bisect.bisect_left(times, event["ts"])) < len(times):
                end = max(end, times[i])
            intervals.append((name, event["ts"], end))
    return intervals


def sum_by_kind(events: list[dict], instructions: dict, steps: int) -> dict[str, float]:
    """Wall milliseconds per step by kind of a trace's thunks (`our_profile`).

    XLA:CPU runs independent thunks at once, each slowed by the others, so a thunk's duration
    overstates its cost; each instant of the trace is split evenly between the thunks running
    then (`thunk_intervals`), and the kinds add up to the time any thunk ran.
    """
    edges = []  # (time, +1 start / -1 end, kind)
    for name, start, end in thunk_intervals(events):
        kind = our_kind(*instructions.get(name, ("", set())))
        edges += [(start, 1, kind), (end, -1, kind)]
    total = collections.Counter(dict.fromkeys(KINDS, 0.0))
    running = collections.Counter()
    last = None
    for ts, change, kind in sorted(edges, key=lambda edge: (edge[0], edge[1])):
        if last is not None and (count := sum(running.values())):
            for running_kind, n in running.items():
                total[running_kind] += (ts - last) * n / count / 1000 / steps
        running[kind] += change
        last = ts
    return dict(total)


_TORCH_KINDS = {
    "matmul": {
        *("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkldnn_convolution"),
        *("aten::convolution_backward", "aten::mkldnn_convolution", "aten::_convolution"),
        *("aten::linear", "aten::matmul", "aten::dot"),
    },
    "softmax and masking": {
        *("aten::_softmax", "aten::softmax", "aten::_softmax_backward_data"),
        *("aten::masked_fill", "aten::masked_fill_", "aten::triu", "aten::triu_"),
    },
    "gelu": {"aten::gelu", "aten::gelu_backward"},
    "layernorm": {"aten::native_layer_norm", "aten::native_layer_norm_backward"},
    "grouping": {"aten::exponential_", "aten::log", "aten::scatter_", "aten::scatter", "aten::max"},
    "layout copies": {
        *("aten::copy_", "aten::clone", "aten::contiguous", "aten::transpose", "aten::permute"),
        *("aten::view", "aten::reshape", "aten::_unsafe_view", "aten::t", "aten::cat"),
        *("aten::expand", "aten::as_strided", "aten::select", "aten::slice"),
    },
}
# record_function ranges of the step whose every op is the optimiser's (`time_pytorch`).
OPTIMISER_RANGES = ("optimiser", "Optimizer.step", "Optimizer.zero_grad")


def torch_kind(name: str, ancestors: list[str]) -> str:
    """The kind (`KINDS`) of an aten op by its name and the names of the ranges around it."""
    if any(a.startswith(OPTIMISER_RANGES) for a in ancestors):
        return "optimiser"
    for kind, names in _TORCH_KINDS.items():
        if name in names:
            return kind
    return "other"


def torch_profile(run, steps: int) -> dict[str, float]:
    """Milliseconds per step by kind of `steps` calls of `run` under `torch.profiler` (CPU):
    each op's self time, attributed by `torch_kind`."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    total = collections.Counter(dict.fromkeys(KINDS, 0.0))
    for event in prof.events():
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        total[torch_kind(event.name, ancestors)] += event.self_cpu_time_total / 1000 / steps
    return dict(total)


def profile_table(ours: dict[str, float], pytorch: dict[str, float]) -> str:
    """Markdown rows of both sides' milliseconds per step by kind, and their ratio."""
    rows = [
        "| kind | ours, ms/step | PyTorch, ms/step | ours / PyTorch |",
        "|---|---|---|---|",
    ]
    for kind in (*KINDS, "total"):
        a = sum(ours.values()) if kind == "total" else ours.get(kind, 0.0)
        b = sum(pytorch.values()) if kind == "total" else pytorch.get(kind, 0.0)
        ratio = f"{a / b:.2f}" if b else "-"
        rows.append(f"| {kind} | {a:.0f} | {b:.0f} | {ratio} |")
    return "\n".join(rows)
