import onnxruntime as ort
import pytest
import torch

from torchcvt import create_model, export_model
from torchcvt.cli import main
from torchcvt.errors import TorchcvtError
from torchcvt.export import export_onnx, export_program, supported_sizes, unbounded_size

SMALL = {"embed_dim": [16, 32, 48], "num_heads": [1, 2, 3], "depth": [1, 1, 1]}
SIZES = [(1, 224, 224), (2, 96, 160)]  # batch, height, width: the model's size and a non-square one


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = create_model("cvt_13", **SMALL).eval()
    for module in model.modules():  # non-trivial BatchNorm statistics, so that eval mode matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def program(model):
    return export_program(model, torch.randn(2, 3, 64, 64))


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(b, 3, h, w, generator=generator) for b, h, w in SIZES]


def test_exported_program_matches_at_two_sizes(model, program, tmp_path):
    torch.export.save(program, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    for x in _inputs():
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-4)


def test_onnx_matches_at_two_sizes(model, program, tmp_path):
    path = export_onnx(program, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.name == "image" and isinstance(image.shape[0], str) and isinstance(image.shape[3], str)
    for x in _inputs():
        (logits,) = session.run(["logits"], {"image": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), model(x), rtol=0, atol=1e-4)


def test_cli_torchscript_matches_at_two_sizes(model, tmp_path, capsys):
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    overrides = [f"--set={key}={value}" for key, value in SMALL.items()]
    assert main(["export", "--model", "cvt_13", "--checkpoint", str(tmp_path / "weights.pth"), *overrides,
                 "--format", "torchscript", "-o", str(path), "--img-size", "64"]) == 0
    assert "wrote" in capsys.readouterr().out
    scripted = torch.jit.load(str(path))
    for x in _inputs():
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=1e-4)


def test_compile_has_no_graph_breaks(model):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_bad_export_arguments(model, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_model(model, tmp_path / "m.tflite", "tflite")
    with pytest.raises(TorchcvtError, match="output folder .*missing does not exist"):
        export_model(model, tmp_path / "missing" / "m.onnx", "onnx")
    out = str(tmp_path / "x" / "m.onnx")
    assert main(["export", "--model", "cvt_13", "--format", "onnx", "-o", out]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_supported_sizes_match_the_graph_and_are_stated(tmp_path, capsys, caplog):
    """cvt_digits at 32x32 has a 1x1 key/value grid in its last stage, which the tracer specialises."""
    torch.manual_seed(0)
    digits = create_model("cvt_digits").eval()
    assert supported_sizes(digits, 32, 32) == ((19, 34), (19, 34))
    assert supported_sizes(digits, 35, 35) == ((35, None), (35, None)) and unbounded_size(digits) == 35
    assert supported_sizes(create_model("cvt_13", **SMALL), 224, 224) == ((35, None), (35, None))
    torch.save(digits.state_dict(), tmp_path / "digits.pth")
    argv = ["export", "--model", "cvt_digits", "--checkpoint", str(tmp_path / "digits.pth"),
            "--format", "onnx"]
    assert main([*argv, "-o", str(tmp_path / "small.onnx")]) == 0
    assert "(onnx, dynamic batch, heights 19-34 and widths 19-34)" in capsys.readouterr().out
    assert "export at 35 x 35 or more for every larger size" in caplog.text
    session = ort.InferenceSession(str(tmp_path / "small.onnx"), providers=["CPUExecutionProvider"])
    any_size = export_program(digits, torch.randn(2, 3, 35, 35)).module()
    generator = torch.Generator().manual_seed(2)
    for run, sizes in ((lambda x: torch.from_numpy(session.run(["logits"], {"image": x.numpy()})[0]),
                        [(19, 34), (32, 32), (34, 20)]),
                       (any_size, [(35, 35), (48, 224), (100, 37)])):
        for batch, (height, width) in enumerate(sizes, 1):
            x = torch.randn(batch, 3, height, width, generator=generator)
            with torch.no_grad():
                torch.testing.assert_close(run(x), digits(x), rtol=0, atol=1e-4)


def test_exported_program_of_a_224_model_runs_over_a_grid_of_sizes(model, program):
    loaded = program.module()
    generator = torch.Generator().manual_seed(3)
    for height in (35, 64, 224, 301):
        for width in (35, 99, 224):
            x = torch.randn(1, 3, height, width, generator=generator)
            with torch.no_grad():
                torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-4)
