"""`python -m taid_vlm.train CONFIG [...]`, the form the stock launcher runs:
    deepspeed --num_gpus 8 --module taid_vlm.train configs/taid_vlm_2b.yaml
The same arguments and exits as `taid-vlm train` (train/command.py), without the cli above the trainer.
"""

import sys

from taid_vlm.train.command import add_train_command, root_parser, run_parsed

parser, commands = root_parser("taid-vlm")  # the same usage and error lines as `taid-vlm train`
add_train_command(commands)
sys.exit(run_parsed(parser, ["train", *sys.argv[1:]]))
