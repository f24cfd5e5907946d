"""Inversion methods beyond plain DDIM, as plain functions over a batch of latents.

Each method takes the model as a callable `predict_noise(latents, t, step_index)` (the
guided model output, see `worker.methods.common.PredictNoise`) and a scheduler config,
and depends on nothing but torch and diffusers' schedulers: the engine passes its one
guided-noise function and the job's resolved scheduler config.

- `negative_prompt`: the per-step embeddings of negative-prompt inversion;
- `edict`: EDICT coupled inversion and its sampler (exact);
- `ddpm`: edit-friendly DDPM inversion and its sampler (exact);
- `dpmsolver`: DPM-Solver++ multistep inversion and its sampler.
"""
