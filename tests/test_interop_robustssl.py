"""advfast.eval.robustssl: the RobustSSL benchmark's fine-tuning / test settings as transcribed data."""

from __future__ import annotations

import pytest

from advfast.eval.protocols import ProtocolConfig
from advfast.eval.robustssl import (CORRUPTIONS, PRETRAINING, PRETRAINING_OF_FORMAT, TEST, data_settings,
                                    finetune_settings, leaderboard_row, leaderboard_table_name, to_protocol_config)
from advfast.interop import FORMATS


def _sched(settings):
    return {m: (s.epochs, s.batch_size, s.lr, s.milestones) for m, s in settings.items()}


def test_an_unlisted_encoder_gets_the_protocol_the_leaderboard_states():
    generic = (25, 128, 0.1, (15, 20))
    assert _sched(finetune_settings(None)) == {"SLF": generic, "ALF": generic, "AFF": generic}
    assert not any(s.dual_bn for s in finetune_settings(None).values())
    # setup_hyperparameter tests 'DynACL_RCS' while the CLI passes 'DynACL-RCS': it falls to the same branch
    assert _sched(finetune_settings("DynACL-RCS")) == _sched(finetune_settings(None))


def test_per_method_settings_and_the_mode_all_carry_over():
    acl = finetune_settings("ACL")
    assert _sched(acl) == {"SLF": (25, 512, 0.01, (10, 20)), "ALF": (25, 512, 0.01, (10, 20)),
                           "AFF": (100, 128, 0.1, (40, 60))}
    assert acl["AFF"].dual_bn and not acl["SLF"].dual_bn
    air = finetune_settings("DynACL-AIR")  # SLF sets 5 epochs on CIFAR-10; --mode ALL keeps them for ALF and AFF
    assert [s.epochs for s in air.values()] == [5, 5, 5]
    assert [s.epochs for s in finetune_settings("DynACL-AIR", mode_all=False).values()] == [5, 25, 25]
    assert [s.epochs for s in finetune_settings("DynACL-AIR++").values()] == [25, 4, 4]
    assert finetune_settings("DynACL", downstream="cifar100")["SLF"].lr == 0.05
    assert finetune_settings("DynACL", downstream="stl10", resize=96)["AFF"].milestones == (10, 20)


def test_dual_bn_follows_the_run_script():
    assert not finetune_settings("DeACL")["AFF"].dual_bn and not finetune_settings("AdvCL")["AFF"].dual_bn
    assert not finetune_settings("DynACL", downstream="stl10")["AFF"].dual_bn  # CIFAR-10 -> STL-10 rows: --dualBN 0
    assert finetune_settings("DynACL", downstream="stl10", pretrain_dataset="cifar100")["AFF"].dual_bn


def test_test_settings_data_and_leaderboard_form():
    assert (TEST.pgd_steps, TEST.pgd_alpha, TEST.autoattack_version, TEST.autoattack_eps) == (20, 2 / 255, "standard",
                                                                                              8 / 255)
    assert TEST.autoattack_images["stl10"] == 8000 and len(CORRUPTIONS) == 15 and TEST.severities == (1, 2, 3, 4, 5)
    assert (data_settings("stl10").resize, data_settings("stl10").crop) == (32, 32)
    assert (data_settings("stl10", resize=96).crop, data_settings("cifar100", resize=32).crop) == (96, 32)
    assert leaderboard_row(0.8182, 0.46994, 0.72114) == {"ra1": 46.99, "sa1": 81.82, "ca1": 72.11}
    assert leaderboard_row(0.7, 0.4)["ca1"] == 0.0
    assert leaderboard_table_name("cifar10", "stl10", "ALF") == "cifar10-stl10-ALF"
    config = to_protocol_config(finetune_settings("ACL")["AFF"])
    assert isinstance(config, ProtocolConfig)
    assert (config.protocol, config.epochs, config.milestones, config.trades_beta) == ("aff", 100, (40, 60), 6.0)
    assert set(PRETRAINING_OF_FORMAT) <= set(FORMATS) and set(PRETRAINING_OF_FORMAT.values()) <= set(PRETRAINING)
    expected = r"unknown --pretraining method 'DynACL-AIR\+' \(did you mean 'DynACL-AIR\+\+'"
    with pytest.raises(ValueError, match=expected):
        finetune_settings("DynACL-AIR+")
    with pytest.raises(ValueError, match="unknown downstream dataset 'svhn'"):
        data_settings("svhn")
