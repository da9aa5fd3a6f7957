// Interop cases for the Node.js clients: MQTT.js (npm `mqtt`) over TCP and WebSocket, and
// amqplib (npm `amqplib`), against a running Ferry.
//
// Usage: node interop_node.js MQTT_URL [MQTT_WS_URL] [AMQP_URL]
//   e.g. node interop_node.js mqtt://127.0.0.1:1883 ws://127.0.0.1:18083/mqtt amqp://guest:guest@127.0.0.1:5672
// An empty argument skips that part. Prints one line per case, "ok   <case>" or
// "FAIL <case>: <why>", and exits with the number of failed cases. Every wait is bounded.
// NODE_PATH must name the node_modules holding mqtt and amqplib (interop.sh sets it).
'use strict';

const [mqttUrl, wsUrl, amqpUrl] = process.argv.slice(2);
let failed = 0;

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

async function run(name, fn) {
  try {
    await withTimeout(fn(), 15000, name);
    console.log(`ok   ${name}`);
  } catch (e) {
    failed += 1;
    console.log(`FAIL ${name}: ${e && e.stack ? e.stack.split('\n')[0] : e}`);
  }
}

function unique(prefix) {
  return `${prefix}-${process.pid}-${Math.random().toString(16).slice(2, 8)}`;
}

// ---- MQTT.js -----------------------------------------------------------------------------------

function mqttConnect(url, options) {
  const mqtt = require('mqtt');
  return mqtt.connectAsync(url, { reconnectPeriod: 0, connectTimeout: 5000, ...options });
}

function nextMessage(client, topic) {
  return new Promise((resolve) => {
    const onMessage = (t, payload, packet) => {
      if (t === topic) {
        client.removeListener('message', onMessage);
        resolve({ payload: payload.toString(), packet });
      }
    };
    client.on('message', onMessage);
  });
}

async function mqttCases(url, label) {
  for (const protocolVersion of [4, 5]) {
    await run(`MQTT.js ${label}, MQTT ${protocolVersion === 5 ? '5.0' : '3.1.1'}: QoS 0/1/2 publish and subscribe`, async () => {
      const sub = await mqttConnect(url, { protocolVersion, clientId: unique('mqttjs-sub') });
      const pub = await mqttConnect(url, { protocolVersion, clientId: unique('mqttjs-pub') });
      try {
        for (const qos of [0, 1, 2]) {
          const topic = `interop/mqttjs/${label}/${protocolVersion}/${qos}`;
          const granted = await sub.subscribeAsync(topic, { qos });
          if (granted[0].qos !== qos) throw new Error(`granted ${JSON.stringify(granted)}`);
          const got = nextMessage(sub, topic);
          await pub.publishAsync(topic, `hello ${qos}`, { qos });
          const m = await got;
          if (m.payload !== `hello ${qos}` || m.packet.qos !== qos) {
            throw new Error(`got ${m.payload} at QoS ${m.packet.qos}`);
          }
        }
      } finally {
        await Promise.all([sub.endAsync(), pub.endAsync()]);
      }
    });
  }
  await run(`MQTT.js ${label}: retained message and MQTT 5 properties`, async () => {
    const topic = `interop/mqttjs/${label}/retained/${process.pid}`;
    const pub = await mqttConnect(url, { protocolVersion: 5, clientId: unique('mqttjs-ret') });
    try {
      await pub.publishAsync(topic, 'kept', {
        qos: 1,
        retain: true,
        properties: { contentType: 'text/plain', userProperties: { k: 'v' }, correlationData: Buffer.from('c1') },
      });
      const sub = await mqttConnect(url, { protocolVersion: 5, clientId: unique('mqttjs-ret-sub') });
      try {
        const got = nextMessage(sub, topic);
        await sub.subscribeAsync(topic.replace(/retained\/.*/, 'retained/+'), { qos: 1 });
        const m = await got;
        const p = m.packet.properties || {};
        if (m.payload !== 'kept' || !m.packet.retain) throw new Error(`got ${m.payload}, retain ${m.packet.retain}`);
        if (p.contentType !== 'text/plain' || !p.userProperties || p.userProperties.k !== 'v') {
          throw new Error(`properties ${JSON.stringify(p)}`);
        }
      } finally {
        await sub.endAsync();
      }
      await pub.publishAsync(topic, '', { qos: 1, retain: true });
    } finally {
      await pub.endAsync();
    }
  });
}

// ---- amqplib -----------------------------------------------------------------------------------

async function amqpCases(url) {
  const amqp = require('amqplib');
  await run('amqplib: confirm channel publish, consume with acks, in order', async () => {
    const conn = await amqp.connect(url);
    try {
      const ch = await conn.createConfirmChannel();
      const q = unique('interop.amqplib');
      await ch.assertQueue(q, { durable: true });
      for (let i = 0; i < 10; i++) {
        ch.sendToQueue(q, Buffer.from(`m${i}`), { persistent: true, contentType: 'text/plain' });
      }
      await ch.waitForConfirms();
      const got = [];
      await new Promise((resolve, reject) => {
        ch.consume(q, (msg) => {
          if (!msg) return reject(new Error('consumer cancelled'));
          got.push(msg.content.toString());
          ch.ack(msg);
          if (got.length === 10) resolve();
        }).catch(reject);
      });
      if (got.join(',') !== [...Array(10).keys()].map((i) => `m${i}`).join(',')) throw new Error(`got ${got}`);
      await ch.deleteQueue(q);
      await ch.close();
    } finally {
      await conn.close();
    }
  });
  await run('amqplib: topic exchange routing, get, and a 404 closing only the channel', async () => {
    const conn = await amqp.connect(url);
    try {
      const ch = await conn.createChannel();
      const x = unique('interop.amqplib.x');
      await ch.assertExchange(x, 'topic', { autoDelete: true });
      const { queue } = await ch.assertQueue('', { exclusive: true });
      await ch.bindQueue(queue, x, 'plant.*.temp');
      ch.publish(x, 'plant.7.temp', Buffer.from('21.5'));
      ch.publish(x, 'plant.7.humidity', Buffer.from('no'));
      let m = false;
      for (let i = 0; i < 100 && !m; i++) {
        m = await ch.get(queue, { noAck: true });
        if (!m) await new Promise((r) => setTimeout(r, 20));
      }
      if (!m || m.content.toString() !== '21.5' || m.fields.routingKey !== 'plant.7.temp') {
        throw new Error(`get ${m && m.content}`);
      }
      const bad = await conn.createChannel();
      bad.on('error', () => {});
      const err = await bad.checkQueue(unique('interop.missing')).then(
        () => null,
        (e) => e
      );
      if (!err || err.code !== 404) throw new Error(`checkQueue of a missing queue: ${err}`);
      await ch.checkExchange(x); // the connection and the other channel are fine
      await ch.close();
    } finally {
      await conn.close();
    }
  });
  await run('amqplib: direct reply-to RPC (checkQueue of amq.rabbitmq.reply-to first)', async () => {
    const conn = await amqp.connect(url);
    try {
      const server = await conn.createChannel();
      const rpc = unique('interop.amqplib.rpc');
      await server.assertQueue(rpc, { exclusive: true });
      await server.consume(
        rpc,
        (msg) => {
          server.sendToQueue(msg.properties.replyTo, Buffer.from(`re: ${msg.content}`), {
            correlationId: msg.properties.correlationId,
          });
        },
        { noAck: true }
      );
      const client = await conn.createChannel();
      await client.checkQueue('amq.rabbitmq.reply-to');
      const reply = new Promise((resolve) => {
        client.consume('amq.rabbitmq.reply-to', (msg) => resolve(msg), { noAck: true });
      });
      // The consume-ok is in before the publish: amqplib serialises the channel's RPCs.
      await client.checkQueue(rpc);
      client.sendToQueue(rpc, Buffer.from('ping'), { replyTo: 'amq.rabbitmq.reply-to', correlationId: 'c-1' });
      const msg = await reply;
      if (msg.content.toString() !== 're: ping' || msg.properties.correlationId !== 'c-1') {
        throw new Error(`reply ${msg.content} ${msg.properties.correlationId}`);
      }
    } finally {
      await conn.close();
    }
  });
}

(async () => {
  if (mqttUrl) await mqttCases(mqttUrl, 'TCP');
  if (wsUrl) await mqttCases(wsUrl, 'WebSocket');
  if (amqpUrl) await amqpCases(amqpUrl);
  process.exit(failed);
})();
