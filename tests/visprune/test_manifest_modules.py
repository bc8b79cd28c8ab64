"""The typed artifact modules: a writer's `sealed` model is what the reader reads, a wrong field fails before
anything is written, every kind's marker is its schema module's, and the one dtype table agrees with torch."""

import pytest
from pydantic import ValidationError


def test_sealing_the_read_fields_again_gives_the_exporters_manifest(exported):
    from visprune.manifests.common import model_dump, sealed
    from visprune.manifests.engine_set import EngineManifest, read_engine_set
    from visprune.manifests.onnx_set import OnnxSetManifest, read_onnx_set

    for schema, manifest in ((OnnxSetManifest, read_onnx_set(exported["pruned-onnx"])),
                             (EngineManifest, read_engine_set(exported["pruned"]))):
        fields = {k: v for k, v in model_dump(manifest).items() if k not in ("schema", "schema_version",
                                                                             "manifest_sha256")}
        assert sealed(schema, **fields) == manifest  # same fields and the same seal as the writer's


def test_a_writer_cannot_seal_a_manifest_whose_parts_disagree(exported):
    from visprune.manifests.common import model_dump, sealed
    from visprune.manifests.onnx_set import OnnxSetManifest, read_onnx_set

    fields = model_dump(read_onnx_set(exported["pruned-onnx"]))
    del fields["manifest_sha256"]
    with pytest.raises(ValidationError, match="kv_stages"):
        sealed(OnnxSetManifest, **{**fields, "kv_stages": fields["kv_stages"][:-1]})


def test_every_artifact_kind_recognises_the_marker_its_schema_module_writes(exported):
    from visprune.manifests import schema_ids
    from visprune.manifests.engine_set import EngineManifest
    from visprune.manifests.onnx_set import OnnxSetManifest
    from visprune.outputs import ENGINE_SET, ONNX_SET, artifact_kind_at

    assert artifact_kind_at(exported["pruned-onnx"]) is ONNX_SET and artifact_kind_at(exported["pruned"]) is ENGINE_SET
    for schema, ids in ((OnnxSetManifest, schema_ids.ONNX_SET), (EngineManifest, schema_ids.ENGINE_SET)):
        assert (schema.model_fields["schema_"].default, schema.model_fields["schema_version"].default) == ids[:2]


def test_the_dtype_table_agrees_with_torch_and_numpy():
    import numpy as np
    import torch

    from visprune.dtypes import DTYPE_TABLE, host_dtype, torch_dtype

    assert set(DTYPE_TABLE) == {"float32", "float16", "bfloat16"}
    for name, dtype in DTYPE_TABLE.items():
        assert torch.zeros(1, dtype=torch_dtype(name)).element_size() == dtype.itemsize
        assert str(torch_dtype(name)) == f"torch.{name}"
        # numpy has no bfloat16: such host arrays are float32 and the backend casts
        assert host_dtype(name) == (np.float32 if name == "bfloat16" else np.dtype(name))
