"""One D update and one G update. Pure step logic on already-prepared modules.

No host syncs: stats come back as detached device tensors for the loop to accumulate.
D is called twice in the D step (real batch, then fake batch) as in the DCGAN tutorial: separate
BatchNorm statistics for real and fake (ganhacks: never mix them in one batch); DDP is built with
`broadcast_buffers=False` so this is legal under DDP.

With one D update per G update the loop draws `fake = G(z)` once, with its graph: the D step sees
`fake.detach()` and the G step back-propagates through the same `fake`, as the PyTorch DCGAN
tutorial does. That saves one G forward per step compared with regenerating the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from facegan_dist.losses import Stats, d_loss, g_loss


def to_model_input(images_u8: Tensor, device: torch.device) -> Tensor:
    """uint8 [B, 3, S, S] -> float32 in [-1, 1] on `device` (normalisation happens on device)."""
    x = images_u8.to(device, non_blocking=True)
    return x.float().div_(127.5).sub_(1.0)


def input_gradient(acc, out: Tensor, inp: Tensor) -> Tensor:
    """d(sum out)/d(inp) with a graph (for penalties), computed from UNSCALED gradients: under
    fp16 the output is multiplied by the loss scale before autograd.grad and the gradient divided
    by it afterwards (PyTorch's AMP gradient-penalty recipe), so small gradients don't underflow.
    With bf16 or fp32 there is no scaler and the scale is 1."""
    scaler = getattr(acc, "scaler", None)
    scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
    (grad,) = torch.autograd.grad(out.float().sum() * scale, inp, create_graph=True)
    return grad.float() / scale


def gradient_penalty(acc, D: nn.Module, real: Tensor, fake: Tensor, eps: Tensor, c=None) -> Tensor:
    """WGAN-GP (Gulrajani et al. 2017): E[(||grad_x D(x_hat)|| - 1)^2] on x_hat = eps * real +
    (1 - eps) * fake, eps ~ U(0, 1) per sample."""
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    grad = input_gradient(acc, D(x_hat, c), x_hat)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def r1_penalty(acc, real_logits: Tensor, real_in: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018): E[||grad_x D(x)||^2] on real data (real_in requires grad)."""
    grad = input_gradient(acc, real_logits, real_in)
    return grad.flatten(1).pow(2).sum(dim=1).mean()


def d_step(
    acc,
    D: nn.Module,
    opt_d,
    real: Tensor,
    fake: Tensor,
    loss: str,
    *,
    c: Tensor | None = None,
    aug: dict | None = None,
    gp: tuple[float, Tensor] | None = None,
    r1: float = 0.0,
    clip: float | None = None,
) -> Stats:
    """One D update on a real batch and a DETACHED fake batch (G gets no gradient).

    aug: DiffAugment parameters, applied to real and fake alike; gp: (lambda, eps) for WGAN-GP;
    r1: gamma/2 times the lazy interval when R1 is due on this step, else 0; clip: WGAN weight
    clipping bound applied after the update."""
    from facegan_dist.train.augment import apply

    real_in = apply(real, aug) if aug else real
    fake_in = apply(fake, aug) if aug else fake
    if r1:
        real_in = real_in.detach().requires_grad_(True)
    real_logits = D(real_in, c)
    fake_logits = D(fake_in, c)
    loss_d, stats = d_loss(loss, real_logits, fake_logits)
    if gp is not None:
        lam, eps = gp
        penalty = gradient_penalty(acc, D, real_in, fake_in, eps, c)
        loss_d = loss_d + lam * penalty
        stats["penalty"] = penalty.detach()
    if r1:
        penalty = r1_penalty(acc, real_logits, real_in)
        loss_d = loss_d + r1 * penalty
        stats["penalty"] = penalty.detach()
    acc.backward(loss_d)
    opt_d.step()
    opt_d.zero_grad(set_to_none=True)
    if clip is not None:
        with torch.no_grad():
            for p in D.parameters():
                p.clamp_(-clip, clip)
    return stats


def g_step(
    acc, D: nn.Module, opt_g, fake: Tensor, loss: str, *, c=None, aug: dict | None = None
) -> Stats:
    """One G update from `fake = G(z)` (with its graph) through a frozen D: D's parameters get no
    gradient, so nothing leaks into D even on a non-sync micro-step."""
    from facegan_dist.train.augment import apply

    D.requires_grad_(False)
    try:
        loss_g, stats = g_loss(loss, D(apply(fake, aug) if aug else fake, c))
        acc.backward(loss_g)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
    finally:
        D.requires_grad_(True)
    return stats


class PlainBackward:
    """What d_step / g_step ask of an Accelerator (`backward`, `scaler`), done directly.

    Used by GANStep when Accelerate's wrappers would do exactly this (see `needs_accelerate`):
    `Accelerator.backward` divides the loss by the accumulation steps (one kernel more per
    backward, with 1 step) and `AcceleratedOptimizer.step` looks for the `lomo_optim` package with
    importlib (file-system stats) twice per call, and `zero_grad` reads the optimizer's signature:
    0.3-0.4 ms of host time per training step (measured on CPU, docs/PERFORMANCE.md), where a
    64 px DCGAN step on a GPU takes a few ms."""

    scaler = None

    @staticmethod
    def backward(loss: Tensor) -> None:
        loss.backward()


def needs_accelerate(acc) -> bool:
    """Whether the step must go through Accelerate's backward and optimizer wrappers: fp16 (the
    GradScaler lives there), gradient accumulation, or an engine that owns the backward
    (DeepSpeed, Megatron, XLA...). Plain DDP on GPUs or CPUs does its all-reduce in autograd hooks
    of the wrapped module, so a direct `loss.backward()` keeps it."""
    from accelerate.utils import DistributedType

    plain_types = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    return (
        getattr(acc, "scaler", None) is not None
        or getattr(acc, "gradient_accumulation_steps", 1) != 1
        or getattr(acc, "distributed_type", DistributedType.NO) not in plain_types
    )


def capture_cuda_graph(fn: Callable[[], None]) -> Callable[[], None]:
    """Record fn's CUDA work once (nothing runs) as a CUDA graph; return its replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@contextlib.contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Run the block on a side stream, after the current stream's work and before what follows
    (the eager warm-up before a capture, as the PyTorch CUDA-graphs docs do it)."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


GRAPH_WARMUP = 3  # eager steps before a CUDA graph is captured
STAT_KEYS = ("loss_d", "d_real", "d_fake", "loss_g", "d_fake_g", "penalty")
R1_EVERY = 16  # lazy R1: computed on one D step in 16, scaled by 16 (StyleGAN2)


class GANStep:
    """One training step (d_steps D updates on one step in d_every, then one G update) with its
    on-device bookkeeping. Used by the training loop and by `facegan bench train`, so the
    benchmark times exactly the code that trains.

    Randomness that must not depend on the number of processes (noise z, DiffAugment parameters,
    the WGAN-GP mixing weights) is drawn for the GLOBAL batch from a generator seeded by
    (seed, step, phase), and each rank takes its slice: a resumed run needs no RNG state for it.
    Stats are summed on the device (no host sync); `take_stats()` reduces them at log time.
    """

    def __init__(
        self,
        acc,
        G: nn.Module,
        D: nn.Module,
        opt_g,
        opt_d,
        *,
        loss: str,
        d_every: int,
        d_steps: int,
        batch: int,
        z_dim: int,
        seed: int,
        resolution: int = 0,
        augment: tuple[str, ...] = (),
        gp_lambda: float = 10.0,
        r1_gamma: float = 0.0,
        clip: float = 0.01,
        cuda_graphs: bool = False,
    ) -> None:
        self.acc, self.G, self.D, self.opt_g, self.opt_d = acc, G, D, opt_g, opt_d
        # the hot loop skips Accelerate's wrappers where they would only add host time
        self.direct = not needs_accelerate(acc)
        self.bw = PlainBackward() if self.direct else acc
        self.opt_g_hot = getattr(opt_g, "optimizer", opt_g) if self.direct else opt_g
        self.opt_d_hot = getattr(opt_d, "optimizer", opt_d) if self.direct else opt_d
        self.loss, self.d_every, self.d_steps = loss, d_every, d_steps
        self.batch, self.z_dim, self.seed = batch, z_dim, seed
        self.resolution, self.augment = resolution, augment
        self.gp_lambda = gp_lambda if loss == "wgan-gp" else 0.0
        self.r1_gamma = r1_gamma
        self.clip = clip if loss == "wgan" else None
        self.device = acc.device
        bpd = batch // acc.num_processes
        self.rank_slice = slice(acc.process_index * bpd, (acc.process_index + 1) * bpd)
        self.gen = torch.Generator(device=self.device)
        # one G forward serves the D step (detached) and the G step when D trains once per step
        self.fused = d_steps == 1 and d_every == 1
        self.stats_sum = torch.zeros(len(STAT_KEYS), device=self.device)
        self.first_bad = torch.full((), float("inf"), device=self.device)  # first non-finite step
        self.n_d = self.n_g = self.n_pen = 0
        self.d_updates = 0  # for lazy R1
        self.last_c: Tensor | None = None
        # the same work every step: one G forward serves both updates, no augmentation, no
        # penalty (`_fused`); only this can be captured as a CUDA graph
        self.simple = self.fused and not augment and not self.gp_lambda and not r1_gamma
        # CUDA graphs: the fused step is captured once (after GRAPH_WARMUP eager steps) and
        # replayed; inputs are copied into static buffers (see `_graphed`)
        self.cuda_graphs = cuda_graphs
        capturable = self.simple and self.direct and self.device.type == "cuda"
        if cuda_graphs and not (capturable and acc.num_processes == 1):
            # TrainConfig.validate and setup.check_device_settings say why, flag by flag
            raise ValueError("cuda_graphs needs the simple step, no loss scaler, one CUDA device")
        self.graph: Callable[[], None] | None = None  # replays the captured step
        self.static: dict[str, Tensor | None] = {}
        self.eager_left = GRAPH_WARMUP
        self.capture, self.warmup_context = capture_cuda_graph, side_stream  # (tests swap them)

    def _seed(self, step: int, phase: int) -> None:
        """Phase 0 is the G update, 1..d_steps the D updates."""
        self.gen.manual_seed((self.seed * 1_000_003 + step) * 64 + phase)

    def draw_z(self, step: int, phase: int) -> Tensor:
        self._seed(step, phase)
        z = torch.randn(self.batch, self.z_dim, device=self.device, generator=self.gen)
        return z[self.rank_slice]

    def _draw_aug(self) -> dict | None:
        """DiffAugment parameters for this rank's slice (call right after draw_z)."""
        if not self.augment:
            return None
        from facegan_dist.train.augment import params, slice_params

        p = params(self.augment, self.batch, self.resolution, self.gen, self.device)
        return slice_params(p, self.rank_slice)

    def _draw_eps(self) -> Tensor:
        eps = torch.rand(self.batch, 1, 1, 1, device=self.device, generator=self.gen)
        return eps[self.rank_slice]

    def _track(self, step: int | Tensor, offset: int, values: list[Tensor]) -> None:
        """Add this update's stats; remember the first step whose loss is not finite. In place
        (and `step` may be a device tensor) so that a captured CUDA graph updates the same
        tensors on every replay."""
        self.stats_sum[offset : offset + len(values)] += torch.stack(values)
        bad = ~torch.isfinite(values[0])
        marker = torch.where(bad & torch.isinf(self.first_bad), step, self.first_bad)
        self.first_bad.copy_(marker)

    def _fused(self, step: int | Tensor, real: Tensor, c: Tensor | None, z: Tensor) -> None:
        """One D update and one G update from ONE G forward (d_steps = d_every = 1, no
        augmentation, no penalty): the work a CUDA graph captures."""
        fake = self.G(z, c)
        sd = d_step(self.bw, self.D, self.opt_d_hot, real, fake.detach(), self.loss, c=c,
                    clip=self.clip)  # fmt: skip
        self._track(step, 0, [sd["loss_d"], sd["d_real"], sd["d_fake"]])
        sg = g_step(self.bw, self.D, self.opt_g_hot, fake, self.loss, c=c)
        self._track(step, 3, [sg["loss_g"], sg["d_fake_g"]])

    def _graphed(self, step: int, real: Tensor, c: Tensor | None, z: Tensor) -> None:
        """The fused step through a CUDA graph. The first GRAPH_WARMUP steps run eagerly on a side
        stream (cuDNN autotuning, optimizer state, lazy initialisation), the next one captures
        the step into a graph (the whole-network recipe of the PyTorch CUDA-graphs docs:
        grads set to None before capture, capturable Adam) and every step replays it after
        copying its batch, noise and step number into the static input buffers. Host work per
        step: three copies and one replay instead of hundreds of kernel launches."""
        if self.eager_left > 0:
            with self.warmup_context(self.device):
                self._fused(step, real, c, z)
            self.eager_left -= 1
            return
        if self.graph is None:
            st = self.static = {
                "real": real.clone(),
                "c": None if c is None else c.clone(),
                "z": z.clone(),
                "step": torch.zeros((), device=self.device),
            }
            self.opt_g_hot.zero_grad(set_to_none=True)
            self.opt_d_hot.zero_grad(set_to_none=True)
            self.graph = self.capture(lambda: self._fused(st["step"], st["real"], st["c"], st["z"]))
        self.static["real"].copy_(real, non_blocking=True)
        if c is not None:
            self.static["c"].copy_(c, non_blocking=True)
        self.static["z"].copy_(z)
        self.static["step"].fill_(step)
        self.graph()  # replay

    def __call__(self, step: int, next_real: Callable[[], tuple[Tensor, Tensor | None]]) -> int:
        """Run step `step`; `next_real()` returns (real batch as float in [-1, 1] on the device,
        condition c [B, n_cond] or None). Returns the number of real batches consumed."""
        if self.simple:  # the common case: the code a CUDA graph captures, graphed or not
            real, c = next_real()
            self.last_c = c
            z = self.draw_z(step, 1)
            if self.cuda_graphs:
                self._graphed(step, real, c, z)
            else:
                self._fused(step, real, c, z)
            self.n_d += 1
            self.n_g += 1
            self.d_updates += 1
            return 1
        consumed = 0
        fake = None
        if step % self.d_every == 0:
            for sub in range(self.d_steps):
                real, c = next_real()
                self.last_c = c
                z = self.draw_z(step, 1 + sub)
                aug = self._draw_aug()
                gp = (self.gp_lambda, self._draw_eps()) if self.gp_lambda else None
                r1 = 0.0
                if self.r1_gamma and self.d_updates % R1_EVERY == 0:
                    r1 = self.r1_gamma / 2 * R1_EVERY
                if self.fused:
                    fake = self.G(z, c)
                    fake_d = fake.detach()
                else:
                    with torch.no_grad():
                        fake_d = self.G(z, c)
                sd = d_step(self.bw, self.D, self.opt_d_hot, real, fake_d, self.loss, c=c, aug=aug,
                            gp=gp, r1=r1, clip=self.clip)  # fmt: skip
                self._track(step, 0, [sd["loss_d"], sd["d_real"], sd["d_fake"]])
                if "penalty" in sd:
                    self.stats_sum[5] += sd["penalty"]
                    self.n_pen += 1
                self.n_d += 1
                self.d_updates += 1
                consumed += 1
        if fake is None:
            z = self.draw_z(step, 0)
            fake = self.G(z, self.last_c)
            aug = self._draw_aug()
        else:
            self._seed(step, 0)
            aug = self._draw_aug()
        sg = g_step(self.bw, self.D, self.opt_g_hot, fake, self.loss, c=self.last_c, aug=aug)
        self._track(step, 3, [sg["loss_g"], sg["d_fake_g"]])
        self.n_g += 1
        return consumed

    def reset(self) -> None:
        """Forget the interval's stats and the non-finite marker (after a rollback). A CUDA
        graph is dropped too: the restored optimizer state lives in new tensors and the learning
        rates changed, so the next steps warm up and capture again."""
        self.stats_sum.zero_()
        self.first_bad.fill_(float("inf"))
        self.n_d = self.n_g = self.n_pen = 0
        self.graph, self.static, self.eager_left = None, {}, GRAPH_WARMUP

    def take_stats(self, reduce_sum: Callable[[Tensor], Tensor]) -> dict[str, float | None]:
        """Means over the interval and over ranks (a collective via `reduce_sum`); resets."""
        world = self.acc.num_processes
        totals = reduce_sum(self.stats_sum).tolist()  # the one host sync per interval
        out: dict[str, float | None] = {}
        counts = (self.n_d,) * 3 + (self.n_g,) * 2 + (self.n_pen,)
        for k, total, n in zip(STAT_KEYS, totals, counts, strict=True):
            out[k] = total / (n * world) if n else None
        if not self.n_pen:
            out.pop("penalty")
        self.stats_sum.zero_()
        self.n_d = self.n_g = self.n_pen = 0
        return out
