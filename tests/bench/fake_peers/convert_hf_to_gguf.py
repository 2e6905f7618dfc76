"""A stand-in for llama.cpp's converter: checks its input is an HF directory, writes a marker file."""

import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("--outfile", required=True)
parser.add_argument("--outtype", required=True)
args = parser.parse_args()
if not os.path.exists(os.path.join(args.model, "config.json")):
    sys.exit(f"{args.model} is no HF directory")
with open(args.outfile, "w") as f:
    f.write(f"fake GGUF {args.outtype}\n")
