"""Benchmark of metamix.py's training steps against a plain full-precision training step.

Per architecture, in one process, each contender alternates with the full-precision step (A B A B ...)
after a warm-up; the time ratio is contender / baseline within one A B pair and the reported value is the
median over repetitions. Memory is the bytes saved for backward (torch.autograd.graph.saved_tensors_hooks;
each storage counted once, parameters and buffers excluded in every model; for several forwards in one
step, the largest); on CUDA also each step's peak of allocated memory (torch.cuda.max_memory_allocated,
above what was allocated before the step). Every metamix contender runs the speed path that the driver runs
(section 7), except `weight_train_readable`. Contenders:
    weight_train           W4, mixed activation bits (candidates cycled over layers), weight LSQ on
    weight_train_readable  the same step through the readable form of sections 1-2 (plain LSQ, composed ops)
    weight_train_torch_kernels
                           a peer: the same network, bits, steps, grids and gradient scales, each layer's input
                           and weight through PyTorch's own LSQ kernels (TorchKernelLayer), then its op
    weight_train_brevitas  a peer if brevitas is installed: the same network and bits in brevitas' QuantConv2d /
                           QuantLinear, learned per-tensor input and per-channel weight scales (brevitas_layers)
    search_3               bit_search_step, 3 candidates;   search_6: 8,6,5,4,3,2 (also vs search_3)
    meta                   bit_meta_step, 3 candidates (also vs 3 x weight_train)
    meta_torch_kernels     the same bit-meta step on the PyTorch-kernel peer (brevitas fixes a layer's bits when
                           it is built: it has no bit-meta step)
    meta_pairs             bit_meta_step over (A, W) pairs (pairs.py), A x W = 3 x {8,4,2}: 9 passes
                           (also vs 9 x weight_train, and vs meta)
    search_pairs           bit_search_step over the 9 pairs: one convolution per W (also vs search_3)
With --teacher ARCH (distillation, the authors' recipe; a frozen model in eval mode, no gradient):
    teacher                its forward alone
    selection              bit_selection_step in the search epoch: bit-meta (3 passes), then bit-search, same batch
    selection_teacher      the same with the teacher: one teacher forward per batch, its output used by all 4 passes
                           (vs selection + teacher: at most 1 when the output is reused, about 1 + 3 x teacher
                           share if it were recomputed per pass, as the authors' code does)
    weight_train_teacher   weight_train with the teacher (vs weight_train + teacher)
It reports; it asserts nothing.

Run it:
    python bench_metamix.py                          # CPU: batch 32, 112 px, resnet18 + MobileNets
    python bench_metamix.py --json                   # ... plus one JSON object as the last line
    python bench_metamix.py --quick                  # smoke test: 32 px, batch 4, 1 warm-up, 2 reps, 1 thread
    python bench_metamix.py --arch resnet18 --reps 9 --threads 2
    python bench_metamix.py --device cuda --amp      # GPU: batch 128, 224 px, bf16 autocast
    python bench_metamix.py --arch mobilenet_v3_large --teacher resnet101   # the teacher's share
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import metamix
import pairs

ARCHS = ("resnet18", "mobilenet_v2", "mobilenet_v3_large")
BITS3 = {"resnet18": (8, 4, 2), "mobilenet_v2": (8, 4, 3), "mobilenet_v3_large": (8, 4, 3)}
BITS6 = (8, 6, 5, 4, 3, 2)
W_BITS = 4
# pair mode: the supplement's "9 cases" with 3 activation candidates
W_PAIRS = (8, 4, 2)
# Targets (CPU): (resnet18, MobileNets). Weight training: also at or below the fastest peer (docs/speed.md).
TARGETS = {
    "weight_train": (1.10, 1.25),
    "search_3": (1.3, 1.7),
    "search_6/search_3": (1.15, 1.2),
    "search_pairs/search_3": (1.6, 1.6),
}
SAVED_TARGETS = {"weight_train": (1.25, 1.3)}


# ---- steps ----------------------------------------------------------------------------------


def sgd(params):
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9)


def criterion_of(teacher, images, autocast):
    """The driver's loss for one batch: labels, or distillation from the teacher's one forward."""
    if teacher is None:
        return F.cross_entropy
    with torch.no_grad(), autocast():
        return metamix.distillation_loss(teacher(images))


def train_step(model, images, targets, autocast, teacher=None):
    opt = sgd(model.parameters())

    def step():
        criterion = criterion_of(teacher, images, autocast)
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = criterion(model(images), targets)
        loss.backward()
        opt.step()

    return step


def teacher_step(teacher, images, autocast):
    return lambda: criterion_of(teacher, images, autocast)


def selection_step(model, images, targets, autocast, teacher=None):
    """One iteration of the search epoch as the driver runs it (bit-meta, then bit-search on the same batch)."""
    layers = metamix.searched_layers(model)
    target = metamix.config_gbops([m.macs for m in layers], [4 * W_BITS] * len(layers), metamix.c_fixed_of(model))
    opt, opt_alpha = sgd(metamix.meta_params(model)), sgd(metamix.alphas_of(model))

    def step():
        metamix.bit_selection_step(
            model,
            images,
            targets,
            opt,
            opt_alpha,
            search=True,
            lam=1.0,
            target_gbops=target,
            autocast=autocast,
            criterion=criterion_of(teacher, images, autocast),
        )

    return step


def meta_step(model, images, targets, autocast):
    opt = sgd(metamix.meta_params(model))

    def step():
        opt.zero_grad(set_to_none=True)
        metamix.bit_meta_step(model, images, targets, autocast)
        opt.step()

    return step


def search_step(model, images, targets, autocast):
    layers = metamix.searched_layers(model)
    macs = [m.macs for m in layers]
    target = metamix.config_gbops(macs, [4 * W_BITS] * len(layers), metamix.c_fixed_of(model))  # all at A4
    # Adam, as when the README's figures were measured; the default is now SGD: a few scalars either way
    opt = torch.optim.Adam(metamix.alphas_of(model), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        metamix.bit_search_step(model, images, targets, 1.0, target, autocast)
        opt.step()

    return step


class TorchKernelLayer(nn.Module):
    """A peer of section 7's fused op: a QuantLayer at its current branch computed with PyTorch's own LSQ kernels,
    torch._fake_quantize_learnable_per_tensor_affine on the input (+3/8 offset where metamix has it) and
    _per_channel_affine on the weight (what torch.ao.quantization's _LearnableFakeQuantize runs), then the layer's op.
    The same steps, bits, ranges and LSQ gradient scales as metamix; the tests hold the kernels equal to sections 1-2
    but on the half-step sliver beyond each end of the range."""

    def __init__(self, q: metamix.QuantLayer):
        super().__init__()
        self.q = q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q
        act = q.act
        wq = q.weight_quant
        bits = act.bits[act.branch]
        qn, qp = metamix.lsq_range(bits, act.signed)
        g = metamix.lsq_grad_scale(x.numel() // x.shape[0], bits, act.signed)
        step = act.step[act.branch : act.branch + 1]
        xf = x.float() + act.offset
        xq = torch._fake_quantize_learnable_per_tensor_affine(xf, step, xf.new_zeros(1), qn, qp, g) - act.offset
        # weights in full precision where metamix has them so (bit-meta)
        w = q.weight
        if wq.enabled:
            wn, wp = metamix.lsq_range(wq.bits, True, wq.narrow)
            gw = metamix.lsq_grad_scale(q.weight[0].numel(), wq.bits, True)
            zeros = q.weight.new_zeros(len(wq.step))
            w = torch._fake_quantize_learnable_per_channel_affine(q.weight, wq.step, zeros, 0, wn, wp, gw)
        return q.op(xq, w, q.bias)


def with_layers(model: nn.Module, make) -> nn.Module:
    """A copy of a patched model (its steps initialised) with each quantized layer q replaced by make(q)."""
    peer = copy.deepcopy(model)
    for q in metamix.quant_layers(peer):
        parent, _, child = q.name.rpartition(".")
        setattr(peer.get_submodule(parent), child, make(q))
    return peer


def torch_kernels(model: nn.Module) -> nn.Module:
    """A copy of a patched model (its steps initialised) whose quantized layers run TorchKernelLayer."""
    return with_layers(model, TorchKernelLayer)


def brevitas_layers(model: nn.Module) -> nn.Module | None:
    """A second peer: a copy of a patched model (its steps initialised) whose quantized layers are brevitas'
    QuantConv2d / QuantLinear at the same bits: the input through a learned per-tensor scale (Int8 / Uint8
    ActPerTensorFloat at the layer's current activation bits, signed as metamix's grid, the scale a Parameter
    initialised at metamix's step x Qp, brevitas' own threshold), the weight through a learned per-channel scale
    (Int8WeightPerChannelFloat at W bits, narrow range, initialised from the weights' max). No offset grid (brevitas
    has no +3/8 shift). None without brevitas (an optional dependency of this benchmark only)."""
    try:
        import brevitas.nn as qnn
        from brevitas.inject.enum import ScalingImplType
        from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActPerTensorFloat
    except ImportError:
        return None
    weight_quant = Int8WeightPerChannelFloat.let(scaling_impl_type=ScalingImplType.PARAMETER_FROM_STATS)

    def brevitas_layer(q: metamix.QuantLayer) -> nn.Module:
        act = q.act
        bits = act.bits[act.branch]
        threshold = float(metamix.positive(act.step[act.branch].detach())) * metamix.lsq_range(bits, act.signed)[1]
        act_quant = (Int8ActPerTensorFloat if act.signed else Uint8ActPerTensorFloat).let(
            scaling_impl_type=ScalingImplType.PARAMETER, scaling_init=threshold
        )
        kw = dict(bias=q.bias is not None, weight_quant=weight_quant, weight_bit_width=q.weight_quant.bits)
        kw.update(input_quant=act_quant, input_bit_width=bits, return_quant_tensor=False)
        w = q.weight
        if q.op.kind == "linear":
            layer = qnn.QuantLinear(w.shape[1], w.shape[0], **kw)
        else:
            op = q.op
            groups = dict(stride=op.stride, padding=op.padding, dilation=op.dilation, groups=op.groups)
            layer = qnn.QuantConv2d(w.shape[1] * op.groups, w.shape[0], w.shape[2:], **groups, **kw)
        with torch.no_grad():
            layer.weight.copy_(w)
            if q.bias is not None:
                layer.bias.copy_(q.bias)
        return layer.to(w.device)

    return with_layers(model, brevitas_layer)


def init_steps(model, images, modes):
    """One no-grad forward per mode so that every LSQ step used later is initialised."""
    with torch.no_grad():
        for mode, kw in modes:
            metamix.set_mode(model, mode, **kw)
            model(images)


def build(arch, images, targets, autocast, device, teacher_arch=None):
    """{name: (model, step)} for the baseline and every contender; the same initial weights for all."""
    torch.manual_seed(0)
    base = torchvision.models.get_model(arch, weights=None, num_classes=1000).to(device)

    # the speed path, as the driver runs it
    def patched(bits, w_bits=W_BITS, layer_type=metamix.QuantLayer):
        return metamix.use_speed_path(metamix.patch_model(copy.deepcopy(base), bits, w_bits, layer_type=layer_type))

    bits3 = BITS3[arch]
    out = {"fp": (base_model := copy.deepcopy(base), train_step(base_model, images, targets, autocast))}

    wt = patched(bits3)
    layers = metamix.searched_layers(wt)
    metamix.apply_selection(wt, [i % len(bits3) for i in range(len(layers))])
    init_steps(wt, images, [("selected", {"quant_weights": True})])
    out["weight_train"] = (wt, train_step(wt, images, targets, autocast))

    readable = metamix.use_speed_path(copy.deepcopy(wt), False)
    out["weight_train_readable"] = (readable, train_step(readable, images, targets, autocast))
    peer = torch_kernels(wt)
    out["weight_train_torch_kernels"] = (peer, train_step(peer, images, targets, autocast))
    brevitas = brevitas_layers(wt)
    if brevitas is not None:
        out["weight_train_brevitas"] = (brevitas, train_step(brevitas, images, targets, autocast))

    for name, bits in (("search_3", bits3), ("search_6", BITS6)):
        m = patched(bits)
        init_steps(m, images, [("search", {"quant_weights": False})])
        out[name] = (m, search_step(m, images, targets, autocast))

    meta = patched(bits3)
    init_steps(meta, images, [("meta", {"branch": b, "quant_weights": False}) for b in range(len(bits3))])
    out["meta"] = (meta, meta_step(meta, images, targets, autocast))
    # the peer switches its branch as metamix's layers do (set_mode reaches the QuantLayer inside each peer layer)
    meta_peer = torch_kernels(meta)
    out["meta_torch_kernels"] = (meta_peer, meta_step(meta_peer, images, targets, autocast))

    meta_pairs = patched(bits3, W_PAIRS, pairs.PairQuantLayer)
    n_pairs = len(bits3) * len(W_PAIRS)
    init_steps(meta_pairs, images, [("meta", {"branch": b}) for b in range(n_pairs)])
    out["meta_pairs"] = (meta_pairs, meta_step(meta_pairs, images, targets, autocast))
    pairs_s = patched(bits3, W_PAIRS, pairs.PairQuantLayer)
    init_steps(pairs_s, images, [("search", {})])
    out["search_pairs"] = (pairs_s, search_step(pairs_s, images, targets, autocast))
    if teacher_arch:
        teacher = torchvision.models.get_model(teacher_arch, num_classes=1000).to(device).eval().requires_grad_(False)
        out["teacher"] = (teacher, teacher_step(teacher, images, autocast))
        for name, t in (("selection", None), ("selection_teacher", teacher)):
            m = patched(bits3)
            init_steps(m, images, [("meta", {"branch": b, "quant_weights": False}) for b in range(len(bits3))])
            out[name] = (m, selection_step(m, images, targets, autocast, t))
        out["weight_train_teacher"] = (wt_t := copy.deepcopy(wt), train_step(wt_t, images, targets, autocast, teacher))
    return out


# ---- measurement ----------------------------------------------------------------------------


def saved_bytes(model: nn.Module, step) -> int:
    """Bytes saved for backward by one step: per model forward, distinct storages (by data_ptr),
    parameters and buffers excluded; the largest over the step's forwards (bit-meta runs N)."""
    state = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    # held keeps storages alive so that no pointer is reused during the step
    buckets, held = [], []

    def pack(t):
        held.append(t)
        st = t.untyped_storage()
        if st.data_ptr() not in state and buckets:
            buckets[-1][st.data_ptr()] = st.nbytes()
        return t

    handle = model.register_forward_pre_hook(lambda *_: buckets.append({}))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
    finally:
        handle.remove()
    return max(sum(b.values()) for b in buckets)


def timed(step, sync) -> float:
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - t0


def bench_arch(arch, args, device, autocast, sync):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device)
    targets = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)
    steps = build(arch, images, targets, autocast, device, args.teacher)
    base = steps["fp"][1]
    names = [n for n in steps if n != "fp"]
    for _ in range(args.warmup):
        for n in ["fp", *names]:
            steps[n][1]()
    mem = {n: saved_bytes(m, s) for n, (m, s) in steps.items()}
    # on CUDA also the step's peak of allocated memory above what was allocated before it (torch's allocator)
    peak = {}
    if device.type == "cuda":
        for n, (_, s) in steps.items():
            sync()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            s()
            sync()
            peak[n] = torch.cuda.max_memory_allocated(device) - before
    t = {n: [] for n in names}
    tb = {n: [] for n in names}
    for _ in range(args.reps):
        # A B A B: the baseline right before each contender
        for n in names:
            tb[n].append(timed(base, sync))
            t[n].append(timed(steps[n][1], sync))
    ratio = {n: [x / y for x, y in zip(t[n], tb[n])] for n in names}
    n_meta = len(BITS3[arch])
    res = {
        "fp": {
            "time_ratio": 1.0,
            "saved_bytes_ratio": 1.0,
            "ms": 1e3 * statistics.median(sum(tb.values(), [])),
            "saved_bytes": mem["fp"],
        }
    }
    if peak:
        res["fp"]["peak_step_bytes"] = peak["fp"]
    for n in names:
        res[n] = {
            "time_ratio": statistics.median(ratio[n]),
            "time_ratio_min": min(ratio[n]),
            "time_ratio_max": max(ratio[n]),
            "ms": 1e3 * statistics.median(t[n]),
            "saved_bytes_ratio": mem[n] / mem["fp"],
            "saved_bytes": mem[n],
        }
        if peak:
            res[n]["peak_step_bytes"] = peak[n]
            res[n]["peak_step_bytes_ratio"] = peak[n] / peak["fp"]
    res["search_6"]["time_ratio_vs_search_3"] = statistics.median(
        [a / b for a, b in zip(ratio["search_6"], ratio["search_3"])]
    )
    res["meta"]["time_ratio_vs_n_weight_train"] = statistics.median(
        [a / (n_meta * b) for a, b in zip(ratio["meta"], ratio["weight_train"])]
    )
    n_pairs = n_meta * len(W_PAIRS)
    res["meta_pairs"]["time_ratio_vs_n_weight_train"] = statistics.median(
        [a / (n_pairs * b) for a, b in zip(ratio["meta_pairs"], ratio["weight_train"])]
    )
    res["meta_pairs"]["time_ratio_vs_meta"] = statistics.median(
        [a / b for a, b in zip(ratio["meta_pairs"], ratio["meta"])]
    )
    res["search_pairs"]["time_ratio_vs_search_3"] = statistics.median(
        [a / b for a, b in zip(ratio["search_pairs"], ratio["search_3"])]
    )
    for with_t, without in (("selection_teacher", "selection"), ("weight_train_teacher", "weight_train")):
        # the cost with the teacher against the cost without it plus one teacher forward
        if with_t in res:
            res[with_t]["time_ratio_vs_without_plus_teacher"] = statistics.median(
                [a / (b + c) for a, b, c in zip(ratio[with_t], ratio[without], ratio["teacher"])]
            )
            res[with_t]["teacher_share"] = statistics.median([c / a for a, c in zip(ratio[with_t], ratio["teacher"])])
    return res


def target_text(arch, key, table):
    if key not in table:
        return ""
    lim = table[key][0 if arch == "resnet18" else 1]
    return f"<= {lim:.2f}"


def print_table(results):
    print(
        f"{'arch':<19}{'contender':<30}{'ms/step':>9}{'time x fp':>11}{'[min, max]':>16}{'target':>9}"
        f"{'saved MB':>10}{'saved x fp':>12}{'target':>9}"
    )
    for arch, res in results.items():
        for n, r in res.items():
            span = f"[{r['time_ratio_min']:.2f}, {r['time_ratio_max']:.2f}]" if "time_ratio_min" in r else ""
            print(
                f"{arch:<19}{n:<30}{r['ms']:>9.1f}{r['time_ratio']:>11.3f}{span:>16}"
                f"{target_text(arch, n, TARGETS):>9}{r['saved_bytes'] / 2**20:>10.1f}"
                f"{r['saved_bytes_ratio']:>12.3f}{target_text(arch, n, SAVED_TARGETS):>9}"
            )
        print(
            f"{arch:<19}{'search_6 / search_3':<30}{'':>9}{res['search_6']['time_ratio_vs_search_3']:>11.3f}"
            f"{'':>16}{target_text(arch, 'search_6/search_3', TARGETS):>9}"
        )
        print(f"{arch:<19}{'meta / (3 x weight_train)':<30}{'':>9}{res['meta']['time_ratio_vs_n_weight_train']:>11.3f}")
        n_pairs = len(BITS3[arch]) * len(W_PAIRS)
        print(
            f"{arch:<19}{f'meta_pairs / ({n_pairs} x weight_train)':<30}{'':>9}"
            f"{res['meta_pairs']['time_ratio_vs_n_weight_train']:>11.3f}"
        )
        print(f"{arch:<19}{'meta_pairs / meta':<30}{'':>9}{res['meta_pairs']['time_ratio_vs_meta']:>11.3f}")
        print(f"{arch:<19}{'search_pairs / search_3':<30}{'':>9}{res['search_pairs']['time_ratio_vs_search_3']:>11.3f}")
        for with_t, without in (("selection_teacher", "selection"), ("weight_train_teacher", "weight_train")):
            if with_t in res:
                r = res[with_t]
                name = f"{with_t} / ({without} + teacher)"
                v = r["time_ratio_vs_without_plus_teacher"]
                print(f"{arch:<19}{name:<48}{v:>7.3f}   (the teacher's share of {with_t}: {r['teacher_share']:.2f})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--arch", default=",".join(ARCHS), help="comma-separated torchvision archs")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the models and tensors run")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: 32 cpu, 128 cuda)")
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: 112 cpu, 224 cuda)")
    p.add_argument("--reps", type=int, default=5, help="timed A B repetitions per contender (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of every contender first")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="CI smoke test: 32 px, batch 4, 1 warm-up, 2 reps, 1 thread")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument(
        "--teacher",
        metavar="ARCH",
        help="also time distillation from this torchvision model, e.g. "
        "resnet101 (random weights: the time is the same)",
    )
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    if a.quick:
        a.batch_size, a.image_size, a.warmup, a.reps = a.batch_size or 4, a.image_size or 32, 1, 2
        # one thread: no OpenMP stalls when CI shares the cores
        a.threads = a.threads or 1
    a.batch_size = a.batch_size or (128 if cuda else 32)
    a.image_size = a.image_size or (224 if cuda else 112)
    a.arch = [s.strip() for s in a.arch.split(",") if s.strip()]
    return a


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp else contextlib.nullcontext
    print(
        f"# torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {args.batch_size}, "
        f"{args.image_size} px, warm-up {args.warmup}, reps {args.reps}, amp {args.amp}"
    )
    results = {}
    for arch in args.arch:
        t0 = time.perf_counter()
        results[arch] = bench_arch(arch, args, device, autocast, sync)
        print(f"# {arch}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print_table(results)
    if args.json:
        print(json.dumps(results, sort_keys=False))


if __name__ == "__main__":
    main()
