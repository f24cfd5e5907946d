"""The inversion engine: DDIM inversion of a batch of images with a loaded model.

Plain functions over tensors: no Redis, no HTTP, no global state. The local CLI, the
worker and the benchmarks all call `dispatch.invert`. The modules form layers, each
importing only those below it:

- `types` (requests, results, what a request's parameters decide), `encoding` (image and
  prompts in, latents out and back), `guidance` (the one noise prediction, owning the
  dtype casts), `schedulers`, `rows` (rows across cancel checks);
- `ddim`: plain DDIM inversion with refinement, the numbered steps of the method;
- `null_text` (on top of `ddim`'s pivot), `method_runs` (EDICT, DDPM, negative-prompt and
  DPM-Solver++ runs of `worker.methods`' equations), and `verify` / `method_verify`
  (sampling a result back with its method's sampler);
- `dispatch`: `invert`, grouping compatible requests and running their phases.
"""
