# Run OUTSIDE the package, against the official code (docs/methods_deacl_ainfonce_rcs.md, "Validation").
# Setup (GodXuxilie/Efficient_ACL_via_RCS @ 6fc9aef, ACL_RCS/small_scale_datasets/): into /tmp/f/rcs copy RCS.py,
# ot.py, models/resnet_multi_bn.py (+ an empty models/__init__.py) and a utils.py holding only the official
# normalize_fn and NormalizeByChannelMeanStd (the real utils.py imports autoattack at module level).
# Takes ~9 min on 2 shared CPU cores (official ResNet-18 in float64).
# Runs RCS's official selection (ACL_RCS/small_scale_datasets/RCS.py: RCS.update_subset_indice, HEAD 6fc9aef,
# --CoresetLoss KL) with the official dual-BN ResNet-18 + proj_head on CPU in float64 against
# advfast.methods.coreset_rcs.rcs_select: same selected indices, same greedy gains.
# Stubs: .cuda() is the identity; the selection DataLoader runs unshuffled in the main process (both sides
# see the same batch order); random starts are switched off on both sides (official torch.rand_like -> 0.5,
# i.e. delta = 0; advfast RCSSettings(random_start=False)), so the comparison is deterministic.
import sys, types, logging, copy, torch, torch.nn as nn
sys.path.insert(0, "/tmp/f/rcs")
torch.Tensor.cuda = lambda self, *a, **k: self
nn.Module.cuda = lambda self, *a, **k: self
torch.set_default_dtype(torch.float64)
import RCS as official
from models.resnet_multi_bn import resnet18, proj_head
_DL = official.DataLoader
official.DataLoader = lambda ds, **k: _DL(ds, batch_size=k["batch_size"], shuffle=False, num_workers=0)
official.torch = types.SimpleNamespace(**{n: getattr(torch, n) for n in dir(torch) if not n.startswith("__")})
official.torch.rand_like = lambda x: torch.full_like(x, 0.5)
gains_seen = []
def _matmul(a, b):
    out = torch.matmul(a, b); gains_seen.append(out.detach().clone().reshape(-1)); return out
official.torch.matmul = _matmul
from advfast.methods.coreset_rcs import RCSSettings, rcs_select, val_rows_as_coded

torch.manual_seed(0)
bn_names = ["normal", "pgd"]
model = resnet18(pretrained=False, bn_names=bn_names)
model.fc = proj_head(model.fc.in_features, bn_names=bn_names)
model.eval()
with torch.no_grad():  # non-trivial BN statistics so the branches differ
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) or isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.1, 0.1); m.running_var.uniform_(0.5, 1.5)
N, BS, FRAC = 24, 4, 0.5
train = [torch.stack([torch.rand(3, 32, 32), torch.rand(3, 32, 32)]) for _ in range(N)]   # two views per item
val_imgs = torch.rand(6, 3, 32, 32)
val_items = [torch.stack([v, v]) for v in val_imgs]                                       # two identical copies
args = types.SimpleNamespace(CoresetLoss="KL", Coreset_bs=BS, batch_size=BS, pgd_iter=5, Coreset_pgd_iter=3)
ref_model = copy.deepcopy(model)
rcs = official.RCS(train, FRAC, logging.getLogger("rcs"), args, _DL(val_items, batch_size=BS, shuffle=False), ref_model)
rcs.lr = 0.01
off_idx = torch.as_tensor([int(i) for i in rcs.update_subset_indice()])
off_gains = torch.stack([g.max() for g in gains_seen])

mine_model = copy.deepcopy(model)
batches = []
for s in range(0, N, BS):
    items = torch.stack(train[s:s + BS])
    batches.append((torch.arange(s, s + BS), items[:, 0], items[:, 1]))
sel = rcs_select(lambda x, b: mine_model.get_feature(x, b), mine_model.fc, batches, val_rows_as_coded(val_imgs, BS), N,
                 RCSSettings(fraction=FRAC, batch_size=BS, random_start=False))
print("official indices", off_idx.tolist())
print("advfast  indices", sel.indices.tolist())
print("official gains", off_gains.tolist())
print("advfast  gains", sel.gains.tolist())
assert torch.equal(off_idx, sel.indices)
print("max rel gain diff", ((off_gains - sel.gains).abs() / off_gains.abs()).max().item())
print("all gains of the official first step", gains_seen[0].tolist())
