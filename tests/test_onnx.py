"""torch.onnx.export (dynamo) of the model with a dynamic sequence length, run by onnxruntime."""

import pytest
import torch

from conftest import tiny_model

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


@pytest.mark.slow
def test_onnx_export_with_a_dynamic_sequence_length_matches_torch(tmp_path):
    wrapped = Logits(tiny_model(sparse_components=["polynomial", "spectral", "feedback"])).eval()
    x = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    seq = torch.export.Dim("seq", min=2, max=64)
    torch.onnx.export(wrapped, (x,), dynamo=True, dynamic_shapes=({1: seq},)).save(str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    for length in (5, 12, 30):
        ids = torch.randint(1, 97, (2, length), generator=torch.Generator().manual_seed(length))
        out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(out, wrapped(ids), atol=1e-4, rtol=0)
