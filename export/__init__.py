"""aptp.export: a training checkpoint -> expert artifacts, ONNX / TensorRT graphs, manifest.

Public API (imported lazily: ``import aptp.export.manifest`` must not pull torch in, because
the runtime reads manifests with it):

    export_checkpoint(checkpoint, output, options=None) -> dict     the whole export
    ExportOptions                                                   its options (the CLI's)
    load_expert(path, device="cpu", dtype=None) -> UNet             an expert from base config +
                                                                    arch spec + safetensors
    read_manifest(root, verify=True) -> dict                        torch-free integrity check
    write_manifest(root, manifest) -> dict
    export_onnx / validate_onnx / export_and_validate / compare_onnx
    OnnxConfig and one config per kind: UNetOnnxConfig, TextEncoderOnnxConfig,
        VaeDecoderOnnxConfig, VaeEncoderOnnxConfig, VaePosteriorOnnxConfig, RouterEncoderOnnxConfig, RouterHeadOnnxConfig
    Engine, tensorrt_status, aligned_group_count, pad_group_norm_widths   TensorRT
    write_pipeline_dir                                              diffusers ONNX pipeline dirs
    build_scheduler_table                                           scheduler coefficient tables
"""

from __future__ import annotations

from typing import Any

from aptp.lazy import lazy_exports

_EXPORTS = {
    "ExportOptions": ".exporter",
    "export_checkpoint": ".exporter",
    "MANIFEST_FILE": ".manifest",
    "MANIFEST_FORMAT": ".manifest",
    "MANIFEST_FORMAT_VERSION": ".manifest",
    "read_manifest": ".manifest",
    "write_manifest": ".manifest",
    "ExportedGraph": ".onnx_export",
    "OnnxValidationError": ".onnx_export",
    "compare_onnx": ".onnx_export",
    "export_and_validate": ".onnx_export",
    "export_onnx": ".onnx_export",
    "validate_onnx": ".onnx_export",
    "ONNX_CONFIGS": ".onnx_configs",
    "OnnxConfig": ".onnx_configs",
    "RouterEncoderOnnxConfig": ".onnx_configs",
    "RouterHeadOnnxConfig": ".onnx_configs",
    "TextEncoderOnnxConfig": ".onnx_configs",
    "UNetOnnxConfig": ".onnx_configs",
    "VaeDecoderOnnxConfig": ".onnx_configs",
    "VaeEncoderOnnxConfig": ".onnx_configs",
    "VaePosteriorOnnxConfig": ".onnx_configs",
    "Engine": ".tensorrt",
    "aligned_group_count": ".tensorrt",
    "pad_group_norm_widths": ".tensorrt",
    "tensorrt_status": ".tensorrt",
    "write_pipeline_dir": ".pipeline_dirs",
    "build_scheduler_table": ".scheduler_tables",
}

__all__ = sorted([*_EXPORTS, "load_expert"])


def load_expert(path: Any, device: Any = "cpu", dtype: Any = None) -> Any:
    """Rebuild an expert UNet from its directory (base config + arch spec + safetensors), with
    no masks or training state: `aptp.train.experts.load_expert`. Works on a checkpoint's
    ``experts/expert_<k>`` and on an export's."""
    from aptp.train.experts import load_expert as _load_expert

    return _load_expert(path, device=device, dtype=dtype)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
