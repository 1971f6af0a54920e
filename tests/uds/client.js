// Sends DogStatsD metrics with hot-shots over a Unix datagram socket
// (protocol 'uds', which needs the unix-dgram native module): 100
// increments of node.hits and 4 histogram values of node.latency.
// Usage: node client.js SOCKET_PATH
const StatsD = require('hot-shots');

const client = new StatsD({
  protocol: 'uds',
  path: process.argv[2],
  globalTags: ['lang:node'],
  errorHandler: (err) => {
    console.error(`hot-shots: ${err}`);
    process.exitCode = 1;
  },
});
for (let i = 0; i < 100; i += 1) {
  client.increment('node.hits', 1);
}
for (const v of [1, 2, 3, 4]) {
  client.histogram('node.latency', v);
}
client.close((err) => {
  if (err) {
    console.error(`hot-shots close: ${err}`);
    process.exitCode = 1;
  }
});
