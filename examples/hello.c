#include <stdio.h>
int main(void) { printf("Hello from C inside a TVM microVM\n"); return 0; }
