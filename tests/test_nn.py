import pytest
import torch
from helpers import randn

import torch_metal_fused as tmf
from torch_metal_fused.nn import LoRALinear, RMSNorm, Softmax
from torch_metal_fused.testing import assert_matches


def test_rms_norm_state_dict_matches_torch(backend):
    ours = RMSNorm(48, eps=1e-5, device=backend.device)
    theirs = torch.nn.RMSNorm(48, eps=1e-5, device=backend.device)
    with torch.no_grad():
        theirs.weight.copy_(torch.linspace(0.5, 1.5, 48))
    ours.load_state_dict(theirs.state_dict())
    assert set(ours.state_dict()) == {"weight"}
    x = randn((3, 48), torch.float32, backend.device)
    assert_matches(ours(x), theirs(x).double(), torch.float32)


def test_rms_norm_without_affine(backend):
    layer = RMSNorm(16, elementwise_affine=False, device=backend.device)
    assert layer.weight is None and dict(layer.named_parameters()) == {}
    x = randn((2, 16), torch.float32, backend.device)
    ref = x.double() * torch.rsqrt(x.double().square().mean(-1, keepdim=True) + 1e-6)
    assert_matches(layer(x), ref, torch.float32)


def test_softmax_layer(backend):
    x = randn((4, 6, 5), torch.float32, backend.device)
    for dim in (0, 1, -1):
        assert_matches(Softmax(dim)(x), torch.softmax(x.double(), dim), torch.float32)


def test_fresh_lora_equals_base(backend):
    base = torch.nn.Linear(20, 12, device=backend.device)
    layer = LoRALinear.from_linear(base, r=4, alpha=8)
    assert layer.weight is base.weight and layer.bias is base.bias  # shared, not copied
    x = randn((5, 20), torch.float32, backend.device)
    assert torch.equal(layer.lora_b, torch.zeros_like(layer.lora_b)) and layer.lora_a.abs().sum() > 0
    assert_matches(layer(x), base(x).double(), torch.float32)
    assert layer.scaling == 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lora_trains_in_a_plain_loop(backend, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        LoRALinear(16, 32, r=4, alpha=8, dropout=0.1, device=backend.device, dtype=dtype),
        RMSNorm(32, device=backend.device, dtype=dtype),
        LoRALinear(32, 8, r=4, alpha=8, bias=False, device=backend.device, dtype=dtype),
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert set(frozen) == {"0.weight", "0.bias", "2.weight"}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = randn((64, 16), dtype, backend.device)
    target = randn((64, 8), dtype, backend.device, seed=3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), target.float())
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is None) == (name in frozen), name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} changed although frozen"


def test_merge_unmerge(backend):
    torch.manual_seed(1)
    layer = LoRALinear(24, 10, r=4, alpha=8, device=backend.device).eval()
    with torch.no_grad():
        layer.lora_b.normal_()
    x = randn((7, 24), torch.float32, backend.device)
    before = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    assert_matches(layer(x), before.double(), torch.float32, "merged forward")
    layer.unmerge()
    assert not layer.merged
    assert_matches(layer.weight, w0.double(), torch.float32, "unmerged weight")
    assert_matches(layer(x), before.double(), torch.float32, "unmerged forward")


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="hidden_size"):
        RMSNorm(0)
    with pytest.raises(ValueError, match="r must"):
        LoRALinear(4, 4, r=0)
    with pytest.raises(ValueError, match="dropout_p"):
        LoRALinear(4, 4, dropout=1.0)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear.from_linear(torch.nn.Conv1d(1, 1, 1))


def test_public_api():
    assert tmf.BACKENDS == ("metal", "cuda", "reference", "metal-emulated")
    for name in ("softmax", "rms_norm", "lora_linear", "backend_for", "nn"):
        assert hasattr(tmf, name)
