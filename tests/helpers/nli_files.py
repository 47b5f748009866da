"""NLI data sets on disk in the layouts the loader reads (Hugging Face files of each format, one per split)."""
import csv
import json

SPLITS = ("train", "validation", "test")


def write_split(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1))
    elif fmt == "json-lines":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


def write_hf_dir(root, fmt, rows):
    """`root` holding `rows` as each split, in the Hugging Face file layout of `fmt`; returned."""
    root.mkdir(parents=True, exist_ok=True)
    ext = "json" if fmt == "json-lines" else fmt
    for split in SPLITS:
        write_split(root / f"{split}.{ext}", rows, fmt)
    return root
