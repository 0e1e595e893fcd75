const amqp = require('amqplib');
(async () => {
  const conn = await amqp.connect(process.argv[2]);
  conn.on('error', () => {});
  const ch = await conn.createConfirmChannel();
  ch.on('error', () => {});
  await ch.assertExchange('node-x', 'fanout', {durable: false});
  const q = (await ch.assertQueue('', {exclusive: true})).queue;
  await ch.bindQueue(q, 'node-x', '');
  for (let i = 0; i < 100; i++) ch.publish('node-x', '', Buffer.from(String(i)), {headers: {n: i}, persistent: true});
  await ch.waitForConfirms();
  await ch.prefetch(10);
  const got = [];
  await new Promise((resolve) => ch.consume(q, (m) => { got.push(Number(m.content.toString())); ch.ack(m); if (got.length === 100) resolve(); }));
  for (let i = 0; i < 100; i++) if (got[i] !== i) throw new Error('order ' + got);
  try { await ch.checkQueue('nope'); throw new Error('no 404'); } catch (e) { if (e.code !== 404) throw e; }
  await conn.close();
  console.log('amqplib OK');
})().catch((e) => { console.error('amqplib FAIL', e); process.exit(1); });
