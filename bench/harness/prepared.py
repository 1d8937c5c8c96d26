"""A simulated pair prepared in memory exactly as `xfer train` prepares its inputs, and the four
columns a model is scored on (training_defaults, encoder_divergence_table)."""

from __future__ import annotations


def prepare_simulated_pair(size: str, seed: int, base):
    """Simulate one pair and prepare it as `xfer train` does with the data settings of `base` (a
    TrainConfig: PCA embedding, split, peak channels, the test line's peaks mapped); returns
    (training data, test line, every plain baseline's metrics)."""
    from xfer.baselines import run_baselines
    from xfer.data.simulate import simulate_pair
    from xfer.embed import PCAEmbedder, embed_lines
    from xfer.prepare import prepare_line, prepare_training

    A, B = simulate_pair(size, seed=seed)
    emb = embed_lines(PCAEmbedder(base.data.n_components), A.gex, {"test": B.gex})
    data, pre = prepare_training(A.gex, A.peak, emb["train"], base.data, base.optim.seed)
    counts = pre.map_counts(B.peak)
    test = prepare_line(B.name, pre, gex=B.gex, emb=emb["test"], peaks=B.peak, peak_counts=counts)
    bl = run_baselines(peaks_a=pre.training_counts(A.peak), y_a=A.gex.labels, train_idx=data.train_idx,
                       val_idx=data.val_idx, peaks_b=counts, y_b=B.gex.labels, emb_a=data.line.emb,
                       emb_b=test.emb, gex_a=A.gex, gex_b=B.gex, seed=base.optim.seed)
    return data, test, bl


def score_splits(model, data, test, stats) -> dict:
    """The four columns: GEX / PEAK on the training line's validation split and on the test line
    (whose labels only score here)."""
    from xfer.evaluate import classification_metrics
    from xfer.predict import predict_probs

    pv = predict_probs(model, data.line.emb[data.val_idx], data.line.peaks[data.val_idx])
    pt = predict_probs(model, test.emb, test.peaks, stats=stats)
    y_val = data.line.labels[data.val_idx]
    return {"gex_val": classification_metrics(y_val, pv["gex"].argmax(1)),
            "peak_val": classification_metrics(y_val, pv["peak"].argmax(1)),
            "gex_test": classification_metrics(test.labels, pt["gex"].argmax(1)),
            "peak_test": classification_metrics(test.labels, pt["peak"].argmax(1))}
