# Run OUTSIDE the package, against the official code (docs/methods_deacl_ainfonce_rcs.md, "Validation").
# Setup (pantheon5100/DeACL @ 3fb81e3): mkdir -p /tmp/f/deacl;
#   git show HEAD:solo/methods/mocov2_distillation_AT.py > /tmp/f/deacl/mocov2_distillation_AT.py
# (only training_step and generate_training_AE are extracted, with ast: solo-learn/Lightning are not needed).
# Runs DeACL's official training_step and generate_training_AE (solo/methods/mocov2_distillation_AT.py,
# HEAD 3fb81e3; the two methods are extracted with ast and bound to a stub holding the tiny models, the
# Lightning logging and the online probe stubbed) on CPU in float64 against advfast.losses.deacl.deacl_step.
import ast, copy, types, torch, torch.nn as nn, torch.nn.functional as F
src = open("/tmp/f/deacl/mocov2_distillation_AT.py").read()
tree = ast.parse(src)
fns = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in ("training_step", "generate_training_AE")}
ns = {"torch": torch, "F": F, "Sequence": list, "Any": object}
for f in fns.values():
    f.decorator_list = []
    exec(compile(ast.Module([f], []), "official", "exec"), ns)
from advfast.losses.deacl import deacl_step, freeze_teacher
torch.set_default_dtype(torch.float64)
def net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=2), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6))
worst = 0.0
for seed in range(5):
    torch.manual_seed(100 + seed)
    teacher = net(); student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters(): p.add_(0.05 * torch.randn_like(p))
    x = 8 / 255 + (1 - 16 / 255) * torch.rand(5, 3, 8, 8)   # in [eps, 1-eps]: start clamping never acts
    y = torch.zeros(5, dtype=torch.long)
    st_o, te_o = copy.deepcopy(student), copy.deepcopy(teacher)
    st_o.train()
    self = types.SimpleNamespace(backbone=st_o, projector=nn.Identity(), momentum_backbone=te_o, momentum_projector=nn.Identity(),
                                 epsilon=8 / 255, num_steps=5, step_size=2 / 255, aux_data=False, trades_k=2.0,
                                 _base_shared_step=lambda X, t: {"loss": torch.zeros(()), "acc1": 0, "acc5": 0},
                                 log_dict=lambda *a, **k: None)
    self.generate_training_AE = types.MethodType(ns["generate_training_AE"], self)
    torch.manual_seed(7)
    lo = ns["training_step"](self, (None, [x.clone(), x.clone()], y), 0)
    lo.backward()
    st_m, te_m = copy.deepcopy(student), freeze_teacher(copy.deepcopy(teacher))
    st_m.train()
    lm, parts = deacl_step(st_m, te_m, x.clone(), generator=torch.Generator().manual_seed(7))
    lm.backward()
    worst = max(worst, abs(lm.item() - lo.item()),
                max((a.grad - b.grad).abs().max().item() for a, b in zip(st_m.parameters(), st_o.parameters())),
                max((a - b).abs().max().item() for a, b in zip(st_m.buffers(), st_o.buffers()) if a.is_floating_point()))
    assert all(p.grad is None for p in te_m.parameters())
    assert any(p.grad is not None for p in te_o.parameters())  # the official backward ran through the teacher
print("DeACL step (loss, student grads, BN running stats), 5 seeds: worst abs diff", worst)
# sensitivity: another start gives another loss; the adversarial images moved
st2 = copy.deepcopy(student); st2.train()
l2, p2 = deacl_step(st2, freeze_teacher(copy.deepcopy(teacher)), x.clone(), generator=torch.Generator().manual_seed(8))
print("loss", lm.item(), "other start", l2.item(), "max |x_adv - x|", (parts["x_adv"] - x).abs().max().item())
