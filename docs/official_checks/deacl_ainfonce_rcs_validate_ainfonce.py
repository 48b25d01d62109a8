# Run OUTSIDE the package, against the official code (docs/methods_deacl_ainfonce_rcs.md, "Validation").
# Setup (yqy2001/A-InfoNCE @ b28763e): mkdir -p /tmp/f/ainfonce/stubs/diffdist; touch stubs/diffdist/__init__.py
# stubs/diffdist/functional.py (RoCL's all_gather, never called single-process); then from the repo mirror
#   git show HEAD:Asym-AdvCL/losses.py > /tmp/f/ainfonce/advcl_losses.py
#   git show HEAD:Asym-RoCL/loss.py   > /tmp/f/ainfonce/rocl_loss.py
# Python: the advfast venv. `python deacl_ainfonce_rcs_validate_ainfonce.py` prints the worst relative differences.
# Runs the official A-InfoNCE losses (Asym-AdvCL/losses.py, Asym-RoCL/loss.py, HEAD b28763e) on CPU in
# float64 against advfast.losses.asymmetric_infonce: values and gradients, every variant.
import sys, types, itertools, torch
sys.path[:0] = ["/tmp/f/ainfonce/stubs", "/tmp/f/ainfonce"]
torch.Tensor.cuda = lambda self, *a, **k: self          # CPU: .cuda() is the identity
# (the official masks are float32 0/1 tensors; multiplied with float64 features they promote exactly)
import advcl_losses, rocl_loss
from advfast.losses.asymmetric_infonce import asymmetric_supcon, asymmetric_rocl_nt_xent
torch.manual_seed(0)
worst = 0.0
def cmp(a, b, ga, gb):
    global worst
    worst = max(worst, (a - b).abs().item() / max(1, abs(b.item())), ((ga - gb).abs().max() / gb.abs().max().clamp_min(1e-30)).item())
B, V, D = 6, 4, 8
for hn, sg, w, sd in itertools.product([False, True], [False, True], [1.0, 1.2, 0.7], [0.2, 0.35]):
    args = types.SimpleNamespace(tau_plus=0.12, beta=1.0, adv_weight=w)
    z0 = torch.nn.functional.normalize(torch.randn(V * B, D, dtype=torch.float64), dim=1)
    za = z0.clone().requires_grad_(True)
    feats = torch.stack(za.split(B), dim=1)  # [bsz, n_views, D], view v = block v
    crit = (advcl_losses.SupConLoss if hn else advcl_losses.ori_SupConLoss)(args, temperature=0.5)
    # the official mask is float32 (torch.eye default): cast the module's masks to float64 via torch.eye patch above
    lo = crit(feats, stop_grad=sg, stop_grad_sd=sd); (go,) = torch.autograd.grad(lo, za)
    zb = z0.clone().requires_grad_(True)
    lm = asymmetric_supcon(zb, V, 0.5, 0.07, hard_negatives=hn, stop_grad=sg, stop_grad_degree=sd, adv_weight=w, tau_plus=0.12)
    (gm,) = torch.autograd.grad(lm, zb); cmp(lm, lo, gm, go)
print("Asym-AdvCL SupConLoss/ori_SupConLoss: 24 cases, worst rel diff", worst)
worst = 0.0
for hn, sg, V in itertools.product([False, True], [False, True], [2, 3]):
    args = types.SimpleNamespace(tau=0.12, beta=1.0, adv_weight=1.3, stop_grad=sg, stpg_degree=0.2)
    z0 = torch.randn(V * B, D, dtype=torch.float64)
    za = z0.clone().requires_grad_(True)
    sim, _, _ = rocl_loss.pairwise_similarity_train(za, args, temperature=0.5, adv_type="None")
    lo = (rocl_loss.NT_xent_HN if hn else rocl_loss.NT_xent)(sim, "None" if V == 2 else "Rep", args); (go,) = torch.autograd.grad(lo, za)
    zb = z0.clone().requires_grad_(True)
    lm = asymmetric_rocl_nt_xent(zb, V, 0.5, hard_negatives=hn, stop_grad=sg, stop_grad_degree=0.2, adv_weight=1.3, tau=0.12)
    (gm,) = torch.autograd.grad(lm, zb); cmp(lm, lo, gm, go)
print("Asym-RoCL NT_xent/NT_xent_HN: 8 cases, worst rel diff", worst)
