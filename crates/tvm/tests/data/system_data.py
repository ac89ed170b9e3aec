import locale, os, pwd, socket, ssl, sys, tempfile
checks = {
    'user': pwd.getpwuid(os.getuid()).pw_name,
    'home': pwd.getpwuid(os.getuid()).pw_dir,
    'localhost': socket.gethostbyname('localhost'),
    'shm': tempfile.mkstemp(dir='/dev/shm')[1].startswith('/dev/shm/'),
    'fd': sorted(os.listdir('/dev/fd'))[:3],
    'std': [os.readlink(p) for p in ('/dev/stdin', '/dev/stdout', '/dev/stderr')],
    'locale': locale.getpreferredencoding(),
    'ca': os.path.getsize('/etc/ssl/certs/ca-certificates.crt') > 100000,
    'tz': os.path.isfile('/usr/share/zoneinfo/Europe/Berlin'),
}
for k, v in checks.items():
    print(k, v)
