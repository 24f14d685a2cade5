"""`python -m taid_vlm.train CONFIG [...]`, the form the stock launcher runs:
    deepspeed --num_gpus 8 --module taid_vlm.train configs/taid_vlm_2b.yaml
"""

import sys

from taid_vlm.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
