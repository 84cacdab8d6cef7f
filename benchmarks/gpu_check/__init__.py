"""The prepared GPU check (`aptp-bench gpu-check`, `bash benchmarks/gpu_check/run.sh OUT`).

- `cli`: the options and the run; `python -m aptp.benchmarks.gpu_check` is the same;
- `suite`: the steps (environment, CUDA extension, CUDA tests, UNet-step grid, end to end);
- `models`: SD 2.1-shaped UNets with random weights, their experts and the static model;
- `e2e`: routed mixed batches vs dense vs static, end to end;
- `report`: `summary.md` from `gpu_check.json`;
- `run.sh`: installs carried wheels, builds aptp if needed, runs the check; `fetch_wheels.sh`
  downloads those wheels where a registry is reachable.
"""
