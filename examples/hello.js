console.log(`Hello from Node.js ${process.version} inside a TVM microVM`);
