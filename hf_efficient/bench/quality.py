"""How good the embedded reference models are: validation bits per byte against gzip -9 on the same texts.

The foundation's acceptance bar is the `target` at least 25% below gzip on code and on prose. Bits per
UTF-8 byte make the model and the compressor directly comparable (and byte-level models later).
"""

from __future__ import annotations

from .harness import BenchReport, measure

DESCRIPTION = "reference models' validation bits-per-byte vs gzip -9, code and prose"

TARGET_REDUCTION = 0.25  # the target must be at least this far below gzip


def run(device: str = "cpu", quick: bool = False) -> BenchReport:
    from hf_efficient.eval import bits_per_byte, gzip_bits_per_byte
    from hf_efficient.reference import CORPUS_VERSION, REFERENCE_MODELS, reference_corpus, reference_model

    n_documents = 4 if quick else None
    report = BenchReport(
        "quality",
        "Reference models: validation bits per byte vs gzip -9",
        device=device,
        setup=f"Corpus {CORPUS_VERSION}, validation split, "
        f"{'first 4 documents' if quick else 'every document'} per kind. gzip -9 (raw DEFLATE) on the same texts, "
        "each document alone (as the model scores them) and, stricter, all joined in one stream. "
        "Reduction = 1 - model bpb / gzip bpb.",
    )
    texts = {kind: reference_corpus("validation", kind)[:n_documents] for kind in ("code", "prose")}
    for name in REFERENCE_MODELS:
        model, tokenizer = reference_model(name)
        model = model.to(device)
        parameters = sum(p.numel() for p in model.parameters())
        for kind, documents in texts.items():
            timing = measure(lambda m=model, t=tokenizer, d=documents: bits_per_byte(m, t, d), warmup=0, repeats=1)
            gzip_bpb, gzip_stream_bpb = (
                gzip_bits_per_byte(documents),
                gzip_bits_per_byte(documents, per_document=False),
            )
            report.add_row(
                {
                    "model": name,
                    "params_M": parameters / 1e6,
                    "kind": kind,
                    "documents": len(documents),
                    "MB": sum(len(d.encode()) for d in documents) / 1e6,
                    "bits_per_byte": timing.result,
                    "gzip_bits_per_byte": gzip_bpb,
                    "reduction_vs_gzip": 1 - timing.result / gzip_bpb,
                    "gzip_stream_bits_per_byte": gzip_stream_bpb,
                    "reduction_vs_gzip_stream": 1 - timing.result / gzip_stream_bpb,
                    "eval_s": timing.median_s,
                }
            )
    for row in report.rows:
        if row["model"] == "target":
            for measure_name, key in (
                ("per document", "reduction_vs_gzip"),
                ("one stream", "reduction_vs_gzip_stream"),
            ):
                verdict = "met" if row[key] >= TARGET_REDUCTION else "NOT met"
                report.note(
                    f"target on {row['kind']}: {row[key]:.1%} below gzip ({measure_name}; bar {TARGET_REDUCTION:.0%}) "
                    f"— {verdict}"
                )
    report.bar_plot("bits_per_byte", group="kind", label="model")
    plain = report.plot

    def draw(fig) -> None:  # the model bars plus gzip (per document) as a dashed line over each kind's bars
        plain(fig)
        ax = fig.axes[0]
        width = 0.8 / len(REFERENCE_MODELS)  # as in `bar_plot`: bar k of group i is centred at i + k * width
        for i, kind in enumerate(texts):
            gzip_bpb = next(r["gzip_bits_per_byte"] for r in report.rows if r["kind"] == kind)
            left, right = i - width / 2, i + (len(REFERENCE_MODELS) - 0.5) * width
            ax.hlines(gzip_bpb, left, right, colors="black", linestyles="dashed", label="gzip -9" if i == 0 else None)
        ax.set_ylim(0, 1.25 * max(r["gzip_bits_per_byte"] for r in report.rows))
        ax.legend(fontsize="small", loc="upper left")

    report.plot = draw
    return report
