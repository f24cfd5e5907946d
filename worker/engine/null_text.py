"""Null-text inversion (`method="null_text"`, Mokady et al. 2022): DDIM-inverted latents made
editable under classifier-free guidance g > 1. A DDIM inversion at guidance 1
gives the pivot trajectory z*_0 .. z*_T. Then, sampling from z = z*_T (t from high to low),
each step optimises the unconditional embedding u_t with Adam, starting from the previous
step's (the first from the negative prompt's embedding):

    (4)  eps = eps_u + g * (eps_c - eps_u),   eps_u = unet(z, t, u_t),  eps_c = unet(z, t, c)
    (5)  u_t <- argmin || DDIMScheduler.step(eps, t, z) - z*_{t-1} ||^2

for `null_text_inner_steps` iterations (fewer once the MSE is below `null_text_early_stop`),
then z = DDIMScheduler.step(eps(u_t), t, z). The result adds `null_embeddings`
(steps, 77, hidden), in sampling order: a guided diffusers sampling loop that passes
null_embeddings[i] as the unconditional embedding of its i-th step reconstructs the image.
For SDXL u_t is the pair (embedding, pooled embedding), both optimised (the time ids are
sizes, not learnt); the result adds `null_pooled_embeddings` (steps, pooled) too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from worker.engine.ddim import invert_batch
from worker.engine.encoding import encode_request_prompts, state_dtype
from worker.engine.guidance import guide, unet_noise
from worker.engine.schedulers import sampling_scheduler
from worker.engine.types import (
    CancelCheck,
    InversionRequest,
    InversionResult,
    ProgressCallback,
    progress_total,
    resolution_of,
    result_dtype,
)
from worker.models import LoadedModel


def null_text_batch(
    model: LoadedModel,
    requests: Sequence[InversionRequest],
    *,
    progress: ProgressCallback | None = None,
    check_canceled: CancelCheck | None = None,
    total: int | None = None,
) -> list[InversionResult | None]:
    """Null-text inversion of compatible requests: the pivot inversion, then equations (4-5).

    The rows of a batch share every UNet call; each row has its own embedding, its own Adam
    and its own early stop, so a row's result does not depend on its batch-mates.
    """
    if not requests:
        return []
    first = requests[0].params
    steps = first.num_inference_steps
    inner_steps = first.null_text_inner_steps
    total = total if total is not None else progress_total(first)
    started = time.perf_counter()
    # 1. The pivot: plain (or refined) DDIM inversion at guidance 1, the whole trajectory.
    pivot_requests = [
        InversionRequest(
            r.image,
            r.params.model_copy(
                update={
                    "method": "ddim",
                    "guidance_scale": 1.0,
                    "return_trajectory": True,
                    "verify": False,
                    "result_dtype": "float32",
                }
            ),
        )
        for r in requests
    ]
    pivots = invert_batch(model, pivot_requests, progress=progress, check_canceled=check_canceled)
    alive = [i for i, pivot in enumerate(pivots) if pivot is not None]
    if not alive:
        return [None] * len(requests)
    pivoted = time.perf_counter()

    def report(done: int) -> None:
        if progress is not None:
            progress(steps + done, total)

    dtype = state_dtype(model)
    device = model.device
    timesteps = [int(t) for t in pivots[alive[0]].timesteps]  # type: ignore[union-attr]
    config = pivots[alive[0]].metadata.scheduler_config  # type: ignore[union-attr]
    scheduler = sampling_scheduler(config, timesteps)
    # The compiled UNet (CUDA graphs) cannot be differentiated through: the eager one can.
    unet = getattr(model.unet, "inner", model.unet)
    rows = len(requests)
    embeddings: list[list[torch.Tensor]] = [[] for _ in requests]
    pooled: list[list[torch.Tensor]] = [[] for _ in requests]
    losses: list[list[float]] = [[] for _ in requests]
    # Outside inference mode: the optimisation needs autograd. Only the embeddings require
    # gradients; the model's parameters stay frozen.
    with torch.inference_mode(False), torch.enable_grad():
        with torch.no_grad():
            size = resolution_of(first, model)
            cond, negative = encode_request_prompts(model, requests, size, guided=True)[:2]
            assert negative is not None
            cond, uncond = cond.to(dtype=dtype), negative.to(dtype=dtype)
        # (steps+1, B, C, h, w), filled for live rows; rows canceled in the pivot stay zero.
        shape = pivots[alive[0]].trajectory.shape  # type: ignore[union-attr]
        pivot = torch.zeros((shape[0], rows, *shape[2:]), dtype=dtype, device=device)
        for i in alive:
            pivot[:, i] = pivots[i].trajectory[:, 0].clone().to(device, dtype)  # type: ignore[union-attr,index]
        scales = torch.tensor(
            [r.params.guidance_scale for r in requests], dtype=dtype, device=device
        ).view(-1, 1, 1, 1)
        learning_rate = first.null_text_learning_rate
        early_stop = first.null_text_early_stop

        def guided_step(
            z: torch.Tensor, t: int, eps_c: torch.Tensor, u: _Null, picked: torch.Tensor
        ) -> torch.Tensor:
            """Equation (4), then DDIMScheduler's step, for the rows in `picked`."""
            text = uncond.index_select(0, picked).with_embeds(*u)
            eps_u = unet_noise(model, z, t, text, unet)
            eps = guide(eps_u, eps_c, scales.index_select(0, picked))
            return scheduler.step(eps, t, z).prev_sample

        z = pivot[steps].clone()
        u: _Null = (uncond.embeds.clone(), uncond.pooled)
        for j, i in enumerate(reversed(range(steps))):
            t = timesteps[i]
            target = pivot[i]
            picked = torch.tensor(alive, device=device)
            with torch.no_grad():
                eps_c = unet_noise(
                    model, z.index_select(0, picked), t, cond.index_select(0, picked), unet
                )
            eps_c_full = torch.zeros_like(z).index_copy(0, picked, eps_c)
            # Per row, its unconditional embedding (and for SDXL its pooled one) as leaves.
            embedding = {r: _leaves(u, r) for r in alive}
            optimisers = {r: torch.optim.Adam(list(embedding[r]), lr=learning_rate) for r in alive}
            pending = list(alive)
            for k in range(inner_steps):
                # Cancellation between inner iterations: a canceled row leaves the batch.
                if check_canceled is not None:
                    canceled = set(check_canceled(list(alive)))
                    if canceled:
                        alive = [r for r in alive if r not in canceled]
                        pending = [r for r in pending if r not in canceled]
                        if not alive:
                            return [None] * len(requests)
                if not pending:
                    break
                picked = torch.tensor(pending, device=device)
                prev = guided_step(
                    z.index_select(0, picked),
                    t,
                    eps_c_full.index_select(0, picked),
                    _rows([embedding[r] for r in pending]),
                    picked,
                )
                per_row = (prev - target.index_select(0, picked)).pow(2).flatten(1).mean(1)
                values = per_row.tolist()
                still = [n for n, value in enumerate(values) if not value < early_stop]
                if still:
                    loss = per_row.index_select(0, torch.tensor(still, device=device)).sum()
                    leaves = [leaf for n in still for leaf in embedding[pending[n]]]
                    grads = iter(torch.autograd.grad(loss, leaves))
                    for n in still:
                        for leaf in embedding[pending[n]]:
                            leaf.grad = next(grads)
                        optimisers[pending[n]].step()
                pending = [pending[n] for n in still]
                report(j * inner_steps + k + 1)
            # The step itself, with the optimised embeddings (no gradient).
            with torch.no_grad():
                picked = torch.tensor(alive, device=device)
                u_rows = _rows([tuple(x.detach() for x in embedding[r]) for r in alive])
                z_new = guided_step(
                    z.index_select(0, picked), t, eps_c_full.index_select(0, picked), u_rows, picked
                )
                final = (z_new - target.index_select(0, picked)).pow(2).flatten(1).mean(1).tolist()
                z = z.index_copy(0, picked, z_new)
                new_embeds, new_pooled = u_rows
                u = (
                    u[0].index_copy(0, picked, new_embeds),
                    None
                    if u[1] is None or new_pooled is None
                    else u[1].index_copy(0, picked, new_pooled),
                )
            for n, r in enumerate(alive):
                embeddings[r].append(u_rows[0][n].detach().cpu())
                if u_rows[1] is not None:
                    pooled[r].append(u_rows[1][n].detach().cpu())
                losses[r].append(float(final[n]))
            report((j + 1) * inner_steps)
    done = time.perf_counter()
    timings = {"pivot_s": pivoted - started, "null_text_s": done - pivoted}
    return _results(model, requests, pivots, alive, (embeddings, pooled), losses, timings, started)


_Null = tuple[torch.Tensor, torch.Tensor | None]
"""Unconditional embeddings being optimised: (B, 77, hidden) and for SDXL pooled (B, P)."""


def _leaves(u: _Null, row: int) -> tuple[torch.Tensor, ...]:
    """Row `row`'s embeddings as fresh leaves that require gradients (the pooled one too)."""
    return tuple(x[row : row + 1].detach().clone().requires_grad_(True) for x in u if x is not None)


def _rows(leaves: list[tuple[torch.Tensor, ...]]) -> _Null:
    """Rows' leaves stacked back into (embeddings, pooled or None)."""
    embeds = torch.cat([row[0] for row in leaves])
    return embeds, torch.cat([row[1] for row in leaves]) if len(leaves[0]) > 1 else None


def _results(
    model: LoadedModel,
    requests: Sequence[InversionRequest],
    pivots: list[InversionResult | None],
    alive: list[int],
    embeddings: tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]],
    losses: list[list[float]],
    timings: dict[str, float],
    started: float,
) -> list[InversionResult | None]:
    """Each live row's pivot result with its null embeddings, at the dtype it asked for;
    None for the stopped ones. `timings` (pivot_s, null_text_s) join the pivot's, with
    total_s from `started`."""
    results: list[InversionResult | None] = []
    for index, request in enumerate(requests):
        pivot_result = pivots[index]
        if index not in alive or pivot_result is None:
            results.append(None)
            continue
        params = request.params
        out_dtype = result_dtype(params, model)
        latents = pivot_result.latents.to(out_dtype)
        path = pivot_result.trajectory.to(out_dtype) if params.return_trajectory else None  # type: ignore[union-attr]
        nulls = torch.stack(embeddings[0][index]).to(out_dtype)
        null_pooled = (
            torch.stack(embeddings[1][index]).to(out_dtype) if embeddings[1][index] else None
        )
        metadata = pivot_result.metadata.model_copy(
            update={
                "guidance_scale": params.guidance_scale,
                "latents_shape": list(latents.shape),
                "trajectory_shape": list(path.shape) if path is not None else None,
                "dtype": str(out_dtype).removeprefix("torch."),
                "method": "null_text",
                "null_text_losses": losses[index],
            }
        )
        results.append(
            InversionResult(
                latents=latents,
                timesteps=pivot_result.timesteps,
                metadata=metadata,
                trajectory=path,
                timings={
                    **pivot_result.timings,
                    **timings,
                    "total_s": time.perf_counter() - started,
                },
                null_embeddings=nulls,
                null_pooled_embeddings=null_pooled,
                clean=pivot_result.clean,
            )
        )
    return results
