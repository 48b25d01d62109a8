"""Run the real PKU-ML/DYNACL utils.trades_loss and AIR finetuning_utils.trades_loss_dual (float64, CPU) against
advfast's LP-AFT / LP-AFF AFT step and the test's transcription; and the scripts' train_head step (inline: the
script cannot be imported) against the probe stage."""
# Run OUTSIDE the package, against the official code. OFFICIAL_ROOT (default /tmp/lpscratch/off) must hold
# dynacl/utils.py (PKU-ML/DYNACL @7d143db), air/finetuning_utils.py (GodXuxilie/Enhancing_ACL_via_AIR @15cf0a7)
# and stubs/ (an `autoattack` module and a `robustbench.data` package: import-time stand-ins, never called).
import copy, importlib.util, os, sys
import torch
ROOT = os.environ.get("OFFICIAL_ROOT", "/tmp/lpscratch/off")
TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests")
torch.set_default_dtype(torch.float64)
sys.path[:0] = [ROOT + "/stubs", TESTS]
torch.Tensor.cuda = lambda self, *a, **k: self  # CPU run


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); return mod


dyn = load("dyn_utils", ROOT + "/dynacl/utils.py")
air = load("air_ftu", ROOT + "/air/finetuning_utils.py")
import test_lp_post_stage as t
from advfast.methods.lp_post_stage import lp_aft_stages, lp_aff_stages


class Single(torch.nn.Module):  # LPAFT.py's single-BN network = the 'pgd' route
    def __init__(self, m):
        super().__init__(); self.encoder, self.fc = copy.deepcopy(m.backbone), copy.deepcopy(m.lp_head)
    def forward(self, x):
        return self.fc(self.encoder(x, "pgd"))


class Dual(torch.nn.Module):  # LP-AFF.py's dual-BN resnet18 with the fc, model(x, bn_name)
    def __init__(self, m):
        super().__init__(); self.encoder, self.fc = copy.deepcopy(m.backbone), copy.deepcopy(m.lp_head)
    def forward(self, x, bn_name="normal"):
        return self.fc(self.encoder(x, bn_name))


worst = {}
def rec(k, v): worst[k] = max(worst.get(k, 0.0), float(v))

for seed in range(4):
    for kind in ("lp-aft", "lp-aff"):
        cls = t.LPDemo if kind == "lp-aft" else t.LPDemoAFF
        m, batch, y = t._setup(cls, n=12, seed=seed)
        model = Single(m) if kind == "lp-aft" else Dual(m)
        model.requires_grad_(True)
        stage = (lp_aft_stages(m) if kind == "lp-aft" else lp_aff_stages(m))[1]
        torch.manual_seed(100 + seed)
        loss, _ = t._engine_step(m, stage, batch)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4, momentum=0.9)  # the scripts'
        x = batch.views[0]
        torch.manual_seed(100 + seed)
        if kind == "lp-aft":
            ref = dyn.trades_loss(model=model, x_natural=x, y=y, optimizer=opt, perturb_steps=10)
        else:
            orig = torch.randn
            air.torch.randn = lambda shape, *a, **k: orig(shape, dtype=torch.float64)  # the start in float64
            ref = air.trades_loss_dual(model=model, x_natural=x, y=y, optimizer=opt, perturb_steps=10, natural_mode="pgd")
            air.torch.randn = orig
        opt.zero_grad(); ref.backward(); opt.step()
        rec(f"{kind} loss", abs(loss.item() - ref.item()))
        ours = dict(m.backbone.named_parameters()) | {f"fc.{k}": v for k, v in m.lp_head.named_parameters()}
        for k, v in model.named_parameters():
            k2 = k.removeprefix("encoder.")
            rec(f"{kind} params after SGD step", (ours[k2] - v).abs().max())
        for k, v in model.encoder.named_buffers():
            rec(f"{kind} BN buffers", (dict(m.backbone.named_buffers())[k] - v.to(torch.float64)).abs().max())
        # the test's transcription against the real function, same model copy, same start
        m2, batch2, y2 = t._setup(cls, n=12, seed=seed)
        off = t._Official(m2); off.requires_grad_(True)
        torch.manual_seed(100 + seed)
        start = None if kind == "lp-aft" else 0.001 * torch.randn(x.shape, dtype=torch.float64)
        tr = t._official_trades_loss(off, batch2.views[0], y2, "pgd" if kind == "lp-aft" else "normal", "pgd", start)
        rec(f"{kind} transcription loss vs real", abs(tr.item() - ref.item()))
    # probe: LPAFT.py train_head, inline (model.eval(), CE, SGD lr 0.01 mom 0.9 wd 1e-4 on fc)
    m, batch, y = t._setup(t.LPDemo, n=12, seed=seed)
    model = Single(m)
    for n_, p in model.named_parameters():
        p.requires_grad = n_ in ("fc.weight", "fc.bias")
    loss, _ = t._engine_step(m, lp_aft_stages(m)[0], batch)
    opt_head = torch.optim.SGD(model.fc.parameters(), lr=0.01, weight_decay=1e-4, momentum=0.9)
    out = model.eval()(batch.views[0]); ref = torch.nn.CrossEntropyLoss()(out, y)
    opt_head.zero_grad(); ref.backward(); opt_head.step()
    rec("probe loss", abs(loss.item() - ref.item()))
    rec("probe fc after step", max((m.lp_head.weight - model.fc.weight).abs().max(), (m.lp_head.bias - model.fc.bias).abs().max()))

for k, v in worst.items():
    print(f"{k:45s} max abs diff {v:.2e}")
