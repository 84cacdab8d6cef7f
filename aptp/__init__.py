"""aptp: prompt-routed pruned text-to-image diffusion, from training to edge deployment.

Subpackages (imported on demand so the runtime never pulls torch in):
    aptp.train       prune (router + codes), route, fine-tune experts
    aptp.export      slice experts, export ONNX / TensorRT, write the manifest
    aptp.runtime     torch-free routing, dispatch and sampling
    aptp.benchmarks  latency and quality suites
"""

__version__ = "0.1.0"
