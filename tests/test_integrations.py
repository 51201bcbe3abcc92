"""The trainer callbacks (crh_kernels.integrations), run for real on CPU: a tiny random GPT-2
trained a few steps with ``transformers.Trainer``, a small LightningModule with
``lightning.Trainer``; the TensorBoard event files are read back with tensorboard's own reader
and compared with the collector's final report, the report files are read back too.

The packages come with the extras ``[hf]``, ``[lightning]``, ``[tensorboard]``; CI installs
them, so there (``CI`` set) a missing one is an error, not a skip.
"""
import glob
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # nothing is downloaded: the model is built here
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from crh_kernels import Report  # noqa: E402
from crh_kernels.analysis import RELATIONS  # noqa: E402

# A causal LM's last position feeds no loss term: its gradient rows are exactly zero, and the
# collector says once per stream that it skipped them. Expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Moments\\(dim=.*zero-norm:RuntimeWarning")


def _need(name):
    if os.environ.get("CI"):
        return __import__(name)
    return pytest.importorskip(name)


def _events(logdir):
    """tensorboard's EventAccumulator over every event file below ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    files = glob.glob(os.path.join(str(logdir), "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no TensorBoard event file under {logdir}"
    acc = EventAccumulator(os.path.dirname(files[0]), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _text(acc, tag):
    """``{step: text}`` of a text summary (torch's SummaryWriter.add_text stores it under
    ``<tag>/text_summary``)."""
    from tensorboard.util import tensor_util
    return {ev.step: tensor_util.make_ndarray(ev.tensor_proto).item().decode()
            for ev in acc.Tensors(f"{tag}/text_summary")}


def _check_logged_alphas(acc, prefix, report, step):
    """Every defined α of the report is a scalar at ``step`` with the same value (float32), and
    nothing else is logged under the prefix."""
    tags = {t for t in acc.Tags()["scalars"] if t.startswith(prefix)}
    want = {}
    for name, e in report.layers.items():
        for rel in RELATIONS:
            v = e["alpha_cov"][rel]
            if v is not None:
                want[f"{prefix}/{name}/{rel}"] = v
    assert len(want) >= 6
    assert tags == set(want)
    for tag, v in want.items():
        got = {ev.step: ev.value for ev in acc.Scalars(tag)}
        assert step in got, (tag, got)
        assert got[step] == pytest.approx(v, rel=1e-6, abs=1e-7), tag


def _check_files(out_dir, report, steps):
    assert os.path.isfile(os.path.join(out_dir, "table.txt"))
    table = open(os.path.join(out_dir, "table.txt")).read()
    assert all(name[-20:] in table for name in report.layers)
    back = Report.from_json(os.path.join(out_dir, "report.json"))
    assert back.layers == json.loads(json.dumps(report.layers))
    series = back.alpha_series
    assert series is not None and series["steps"][-1] == steps
    for name, e in back.layers.items():   # K divides the step count: last point = final α
        assert {r: v[-1] for r, v in series["layers"][name].items()} == e["alpha_cov"]


# ------------------------------------------------------------------------------- transformers
class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seq, vocab):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_hf_trainer_logs_alpha_to_tensorboard_and_writes_the_report(tmp_path):
    _need("tensorboard")
    transformers = _need("transformers")
    from crh_kernels.integrations.hf import CRHCallback

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=6, per_device_train_batch_size=4,
        learning_rate=1e-3, logging_steps=3, eval_strategy="steps", eval_steps=3,
        per_device_eval_batch_size=4, report_to=["tensorboard"], save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(32, 16, 64),
                                   eval_dataset=_Tokens(8, 16, 64))
    out = tmp_path / "crh"
    cb = CRHCallback.attach(trainer, out, log_every=3, alpha_every=2, modules=r"\.h\.\d")
    trainer.train()

    col, rep = cb.collector, cb.report
    assert col.steps == 6
    names = list(rep.layers)
    assert names and all(".h." in n for n in names)            # modules= reached the Collector
    attn = next(n for n in names if n.endswith("attn.c_attn"))  # HF Conv1D
    # training rows only: 6 steps x 4 sequences x 16 tokens, none of the evaluation passes
    assert rep.layers[attn]["n"] == 6 * 4 * 16
    assert all(st.forward_only_calls == 0 for st in col.layers.values())
    # the final report equals col.report() now, and the last logged α (step 6) equal both
    again = col.report()
    assert {n: e["alpha_cov"] for n, e in again.layers.items()} == \
        {n: e["alpha_cov"] for n, e in rep.layers.items()}

    acc = _events(tmp_path / "hf")
    _check_logged_alphas(acc, "train/crh/alpha", rep, 6)
    alpha_steps = {ev.step for ev in acc.Scalars(f"train/crh/alpha/{attn}/backward_RGA")}
    assert alpha_steps == {3, 6}
    # the trainer's own logs survive ours at the same steps
    assert {ev.step for ev in acc.Scalars("train/loss")} == {3, 6}
    assert {ev.step for ev in acc.Scalars("eval/loss")} == {3, 6}
    phases = _text(acc, "train/crh/phases")
    assert set(phases) == {3, 6}
    for name, e in rep.layers.items():
        assert f"| {name} | {e['phase'] or '-'} |" in phases[6]
    _check_files(out, rep, 6)


def test_hf_callback_without_trainer_refuses_to_log(tmp_path):
    _need("transformers")
    from crh_kernels.integrations.hf import CRHCallback
    with pytest.raises(ValueError, match="attach"):
        CRHCallback(tmp_path, log_every=2)
    with pytest.raises(TypeError, match="not a Collector argument"):
        CRHCallback(tmp_path, max_row=3)
    with pytest.raises(ValueError, match="log_every"):
        CRHCallback(tmp_path, log_every=0, trainer=object())


def test_hf_callback_warns_when_nothing_receives_the_logs(tmp_path):
    transformers = _need("transformers")
    from crh_kernels.integrations.hf import CRHCallback

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=4,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=transformers.GPT2LMHeadModel(cfg), args=args,
                                   train_dataset=_Tokens(8, 8, 64))
    cb = CRHCallback.attach(trainer, None, log_every=1)
    with pytest.warns(UserWarning, match="no reporting integration"):
        trainer.train()
    assert cb.report is not None and cb.collector.steps == 2
    assert not os.path.exists(tmp_path / "crh")


def test_hf_callback_without_logging_writes_the_report(tmp_path):
    transformers = _need("transformers")
    from crh_kernels.integrations.hf import CRHCallback

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=4,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    cb = CRHCallback(tmp_path / "crh", alpha_every=2, log_phase=False)
    trainer = transformers.Trainer(model=transformers.GPT2LMHeadModel(cfg), args=args,
                                   train_dataset=_Tokens(16, 8, 64), callbacks=[cb])
    trainer.train()
    assert cb.collector.steps == 4 and cb.collector.alpha_series.steps == [2, 4]
    _check_files(tmp_path / "crh", cb.report, 4)


# ---------------------------------------------------------------------------------- lightning
def _lightning_module(L):
    class Regression(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                           torch.nn.Linear(16, 4))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Regression()


def _regression_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.tanh(x[:, :4] * 2) + 0.1 * torch.randn(n, 4, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def test_lightning_trainer_logs_alpha_to_tensorboard_and_writes_the_report(tmp_path):
    _need("tensorboard")
    L = _need("lightning")
    from lightning.pytorch.loggers import TensorBoardLogger

    from crh_kernels.integrations.lightning import CRHCallback

    torch.manual_seed(0)
    model = _lightning_module(L)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    out = tmp_path / "crh"
    cb = CRHCallback(out, log_every=3, alpha_every=3, plot=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, accumulate_grad_batches=2,
                        val_check_interval=6, limit_val_batches=2, num_sanity_val_steps=2,
                        logger=logger, callbacks=[cb], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1)
    trainer.fit(model, _regression_data(96, 0), _regression_data(16, 1))

    col, rep = cb.collector, cb.report
    assert col.steps == 6 and trainer.global_step == 6
    assert set(rep.layers) == {"net.0", "net.2"}
    # 6 optimizer steps x 2 accumulated batches x 8 rows; no sanity-check or validation rows
    assert rep.layers["net.0"]["n"] == 6 * 2 * 8
    assert all(st.forward_only_calls == 0 for st in col.layers.values())
    acc = _events(logger.log_dir)
    _check_logged_alphas(acc, "crh/alpha", rep, 6)
    assert {ev.step for ev in acc.Scalars("crh/alpha/net.0/forward_RGA")} == {3, 6}
    again = col.report()
    for name, e in again.layers.items():
        for rel, v in e["alpha_cov"].items():
            if v is not None:
                got = {ev.step: ev.value for ev in acc.Scalars(f"crh/alpha/{name}/{rel}")}
                assert got[6] == pytest.approx(v, rel=1e-6, abs=1e-7)
    phases = _text(acc, "crh/phases")
    assert set(phases) == {3, 6}
    for name, e in rep.layers.items():
        assert f"| {name} | {e['phase'] or '-'} |" in phases[6]
    _check_files(out, rep, 6)
    if not os.environ.get("CI"):
        pytest.importorskip("matplotlib")
    assert (out / "alpha_series.png").stat().st_size > 0       # plot=True: the figures too


def test_lightning_callback_warns_when_nothing_receives_the_logs(tmp_path):
    L = _need("lightning")
    from crh_kernels.integrations.lightning import CRHCallback

    cb = CRHCallback(None, log_every=1, log_phase=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, callbacks=[cb],
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="no logger"):
        trainer.fit(_lightning_module(L), _regression_data(16, 0))
    assert cb.collector.steps == 2 and cb.report is not None
