"""Serve a Milvus Lite file over gRPC on a free local port, as a Milvus server does, until killed:
argv PATH.db; prints the server's URI (http://127.0.0.1:PORT) on its first line. Milvus Lite runs
this server inside every process that opens a file; run alone, it lets several processes (torchrun
ranks) reach one gallery as clients of a server, which is what the server path of a backfill needs."""

import sys
import time

from milvus_lite.server_manager import server_manager_instance

uri = server_manager_instance.start_and_get_uri(sys.argv[1])
print(uri, flush=True)
while True:
    time.sleep(60)
