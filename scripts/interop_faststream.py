"""FastStream interop cases against a running Ferry (FastStream's RabbitBroker, on aio-pika):
a publish / subscribe round trip, and an RPC request, which declares `amq.rabbitmq.reply-to`
passively before it publishes (a broker that answers 404 there fails every FastStream RPC).

Usage: python3 interop_faststream.py HOST PORT
Prints one line per case, "ok   <case>" or "FAIL <case>: <why>", and exits with the number of
failed cases. Every wait is bounded.
"""

import asyncio
import logging
import sys
import uuid

from faststream.rabbit import RabbitBroker, RabbitQueue

from interop_case import case, finish

HOST = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 5672
URL = f"amqp://guest:guest@{HOST}:{PORT}/"

logging.getLogger("faststream").setLevel(logging.ERROR)


def name(prefix):
    return f"interop.faststream.{prefix}.{uuid.uuid4().hex[:8]}"


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 30))


@case("FastStream: publish / subscribe round trip")
def pubsub():
    async def go():
        broker = RabbitBroker(URL, logger=None)
        got = asyncio.get_running_loop().create_future()
        queue = RabbitQueue(name("pubsub"), auto_delete=True)

        @broker.subscriber(queue)
        async def handle(body: dict):
            if not got.done():
                got.set_result(body)

        async with broker:
            await broker.start()
            await broker.publish({"n": 7, "text": "hello"}, queue)
            body = await asyncio.wait_for(got, 10)
            assert body == {"n": 7, "text": "hello"}, body

    run(go())


@case("FastStream: RPC request over direct reply-to (passive declare of amq.rabbitmq.reply-to)")
def rpc():
    async def go():
        broker = RabbitBroker(URL, logger=None)
        queue = RabbitQueue(name("rpc"), auto_delete=True)

        @broker.subscriber(queue)
        async def echo(body: str) -> str:
            return f"re: {body}"

        async with broker:
            await broker.start()
            for i in range(3):
                reply = await broker.request(f"ping {i}", queue, timeout=10)
                body = await reply.decode()
                assert body == f"re: ping {i}", body

    run(go())


finish()
