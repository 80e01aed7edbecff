"""The optimizer, the learning-rate schedule and the exponential moving average of the weights."""

from __future__ import annotations

import contextlib
import logging

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from . import sharding
from .models import ModelError
from .plan import TrainPlan
from .settings import OptimizerSettings

logger = logging.getLogger(__name__)

FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # where torch has a fused AdamW kernel and we have run it


class BackwardPassOptimizer(torch.optim.Optimizer):
    """The optimizer step fused into the backward pass (--fused_backward_pass): one optimizer per
    parameter, stepped by a hook the moment backward has finished that parameter's gradient, which
    is then freed. At most one parameter's gradient is alive at a time, instead of all of them
    (7.6 GiB for Flux's default ControlNet in fp32).

    The learning-rate schedule sets ``param_groups``, which are the per-parameter optimizers' own
    groups; checkpoints hold every per-parameter state. ``step`` and ``zero_grad`` have nothing
    left to do. --max_grad_norm clips each parameter's gradient by itself: the norm over all of
    them is never available at once.
    """

    def __init__(self, params, make_one, max_grad_norm: float | None):
        self.parts = [make_one([param]) for param in params if param.requires_grad]
        groups = [group for part in self.parts for group in part.param_groups]
        super().__init__(groups, defaults={})  # the same group dicts: the schedule's lr reaches the parts
        for part in self.parts:
            (param,) = part.param_groups[0]["params"]
            param.register_post_accumulate_grad_hook(self._stepper(part, max_grad_norm))

    @staticmethod
    def _stepper(part: torch.optim.Optimizer, max_grad_norm: float | None):
        def step_now(param: torch.Tensor) -> None:
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_([param], max_grad_norm)
            part.step()
            part.zero_grad(set_to_none=True)

        return step_now

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict) -> None:
        if len(state_dict.get("parts", ())) != len(self.parts):
            raise ValueError(
                "the checkpoint's optimizer state is not a --fused_backward_pass state for these parameters"
            )
        for part, state in zip(self.parts, state_dict["parts"], strict=True):
            part.load_state_dict(state)


def make_optimizer(
    settings: OptimizerSettings, params, learning_rate: float, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer of the flags; with --fused_backward_pass, one per parameter stepped during
    the backward pass (``BackwardPassOptimizer``)."""
    if not settings.fused_backward_pass:
        return _one_optimizer(settings, params, learning_rate, device)
    return BackwardPassOptimizer(
        params,
        lambda one: _one_optimizer(settings, one, learning_rate, device),
        settings.max_grad_norm,
    )


def _one_optimizer(
    settings: OptimizerSettings, params, learning_rate: float, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (fused when training on CUDA or the CPU), bitsandbytes' 8-bit AdamW, or (Flux's
    --use_adafactor, which wins over --use_8bit_adam there as in diffusers) transformers' Adafactor.

    ``device`` is where training runs, not where the parameters are now: the optimizer is made
    before Accelerate moves the ControlNet there, and the choice must follow the destination.
    """
    hyper = {
        "lr": learning_rate,
        "betas": (settings.adam_beta1, settings.adam_beta2),
        "weight_decay": settings.adam_weight_decay,
        "eps": settings.adam_epsilon,
    }
    if settings.use_adafactor:
        return _adafactor(settings, params, learning_rate)
    if settings.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ModelError(
                "--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`, or drop the flag."
            ) from error
        return bnb.optim.AdamW8bit(params, **hyper)
    # One kernel for the whole update: the foreach one (about ten passes over the weights) took
    # 12.3 ms of a 251 ms SD 1.5 step on an H100, and is 4x slower than the fused one on a CPU.
    return torch.optim.AdamW(params, fused=device.type in FUSED_ADAMW_DEVICES or None, **hyper)


def _adafactor(settings: OptimizerSettings, params, learning_rate: float) -> torch.optim.Optimizer:
    """Adafactor at a fixed learning rate (no relative step or parameter scaling, so the schedule
    and --learning_rate mean what they mean for AdamW): factored second moments, no first moment."""
    from transformers.optimization import Adafactor

    if settings.use_8bit_adam:
        logger.warning("--use_adafactor and --use_8bit_adam: training with Adafactor, as diffusers does.")
    return Adafactor(
        params,
        lr=learning_rate,
        scale_parameter=False,
        relative_step=False,
        weight_decay=settings.adam_weight_decay,
    )


def make_lr_scheduler(settings: OptimizerSettings, optimizer, plan: TrainPlan, num_processes: int):
    return get_scheduler(
        settings.lr_scheduler,
        optimizer=optimizer,
        # The prepared scheduler steps once per process per optimizer step.
        num_warmup_steps=settings.lr_warmup_steps * num_processes,
        num_training_steps=plan.max_train_steps * num_processes,
        num_cycles=settings.lr_num_cycles,
        power=settings.lr_power,
    )


def make_ema(settings: OptimizerSettings, controlnet, device: torch.device) -> EMAModel | None:
    if not settings.use_ema:
        return None
    ema = EMAModel(
        controlnet.parameters(), decay=settings.ema_decay, model_cls=type(controlnet), model_config=controlnet.config
    )
    ema.to(device)
    return ema


@contextlib.contextmanager
def averaged_weights(accelerator: Accelerator, controlnet, ema: EMAModel | None):
    """The EMA weights in the ControlNet for the duration (evaluation, final save), then back."""
    if ema is None:
        yield
        return
    parameters = list(accelerator.unwrap_model(controlnet).parameters())
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def final_controlnet(accelerator: Accelerator, controlnet, ema: EMAModel | None):
    """The ControlNet the final save writes, on the main process; every rank must call this.

    The EMA's fp32 average goes into a copy of its own, not into the module: under DeepSpeed
    with bf16 the module is bf16 and would round it.
    """
    if ema is None:
        return sharding.controlnet_to_save(accelerator, controlnet)
    if not accelerator.is_main_process:
        return None
    bare = accelerator.unwrap_model(controlnet)
    names = [name for name, _ in bare.named_parameters()]  # the order EMAModel keeps them in
    weights = {name: average.detach().to("cpu") for name, average in zip(names, ema.shadow_params, strict=True)}
    # Saved buffers are not averaged (SD3's fixed position table): the module's own.
    weights |= {name: value.detach().to("cpu") for name, value in bare.state_dict().items() if name not in weights}
    return sharding.plain_copy(bare, weights)
